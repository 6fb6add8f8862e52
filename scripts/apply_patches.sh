#!/usr/bin/env bash
# Apply our patch series patches/<Name>/000N-*.patch to the pinned submodule third_party/<Name>.
# Run with --help for usage and exit codes; patches/README.md describes the series and the maintainer
# workflow (scripts/refresh_patches.sh regenerates a series from commits).
#
# States of a submodule, comparing trees as `git add` would record them (never touching its index):
#   pristine = working tree equals the pinned commit;
#   applied  = working tree equals the pin with the whole series applied in file order (files the series
#              creates included, even if untracked or ignored);
#   dirty    = anything else. Untracked files the series does not touch are not part of the state.
# Applying goes pristine -> applied, reversing applied -> pristine, each as one `git apply` of the net
# diff, after the whole series was checked on a temporary index; on any refusal or failure the working
# tree is left byte-for-byte as it was. The series must also produce the tree recorded in
# patches/<Name>/series.tree (a truncated or hand-edited patch file may still apply, to something else).
# An interrupt (SIGINT/SIGTERM/SIGHUP) stops the run between submodules: the one `git apply` that writes
# a working tree runs with these signals ignored, so each submodule ends either as it was or in its
# target state, and the script says which and exits 130.
set -euo pipefail

PT_PROG=apply_patches.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/patches.sh
. "$SCRIPT_DIR/lib/patches.sh"

usage() {
  cat <<'EOF'
usage: scripts/apply_patches.sh [--check | --reverse | --status | --record] [NAME ...]

Applies patches/<NAME>/000N-*.patch, in file order, to the working tree of third_party/<NAME>
(a submodule checked out at the commit the superproject pins). Runs from any directory: the project
is the git work tree this script lives in.

  (no option)  apply the series; a submodule already in the applied state is left alone
               ("already applied")
  --check      only check that each series applies at the pin (on a temporary index; the pinned
               commit must be present in third_party/<NAME>, HEAD may be anywhere)
  --reverse    undo the series; refused unless the working tree is exactly the applied state
               (files created by patches are removed); "not applied" if already pristine
  --status     one line per submodule: populated, at pin, applied, dirty, number of patches
  --record     maintainers, after reviewing a series: check it and write patches/<NAME>/series.tree
               (the pin and the tree the series produces), which every other mode verifies
  -h, --help   this text

NAME is a submodule under third_party/ (e.g. FastV). Without NAME: every patches/<NAME>/ folder
(--status: every submodule). Each NAME is handled on its own (all-or-nothing per submodule); the run
goes on after a failure and exits with the code of the first one that failed.

Refusals: HEAD not at the pinned gitlink (both shas are named); a working tree that is neither the pin
nor exactly the applied state (local edits: commit them as patches, or discard them); a series that
does not apply at the pin, or applies but not to the tree recorded in patches/<NAME>/series.tree
(a patch file truncated or edited by hand; apply and --reverse also refuse a series without a record,
--check only notes it).

Interrupting (Ctrl-C) leaves every submodule either as it was or fully in its target state; the
script names the submodule it was working on, what became of it, and the ones it did not reach.

Exit codes:
  0  ok: applied, reversed, already applied, not applied (reverse), no series to apply, or --status
  1  unexpected error, or a file the series changes is absent from a sparse checkout
  2  usage: unknown option, unknown NAME, or a patches/<NAME>/ with no submodule third_party/<NAME>
  3  submodule not populated (skipped; run `git submodule update --init third_party/<NAME>`)
  4  submodule HEAD is not the pinned commit (or the pinned commit is missing from it)
  5  dirty: working tree is neither the pin nor exactly the applied state
  6  the series does not apply at the pin, or does not produce its recorded tree (or has none)
 130 interrupted (SIGINT, SIGTERM or SIGHUP)
EOF
}

mode=apply
names=()
set_mode() {
  [[ $mode == apply ]] || { pt_err "give at most one of --check, --reverse, --status"; exit "$PT_USAGE"; }
  mode=$1
}
while (($#)); do
  case $1 in
    --check) set_mode check ;;
    --reverse) set_mode reverse ;;
    --status) set_mode status ;;
    --record) set_mode record ;;
    -h | --help) usage; exit 0 ;;
    --) shift; names+=("$@"); break ;;
    -*) pt_err "unknown option '$1' (see --help)"; exit "$PT_USAGE" ;;
    *) names+=("$1") ;;
  esac
  shift
done

pt_clean_git_env
ROOT=$(pt_repo_root "$SCRIPT_DIR")
mapfile -t GITLINKS < <(pt_gitlinks "$ROOT")

# Validate names first so a typo fails before anything is touched.
for n in "${names[@]}"; do
  pt_valid_name "$n" || { pt_err "invalid submodule name '$n' (expected e.g. FastV)"; exit "$PT_USAGE"; }
  if [[ -z $(pt_pin "$ROOT" "$n") ]]; then
    pt_err "unknown submodule '$n': HEAD has no gitlink third_party/$n; known: ${GITLINKS[*]:-none}"
    exit "$PT_USAGE"
  fi
done

if ((${#names[@]} == 0)); then
  if [[ $mode == status ]]; then
    names=("${GITLINKS[@]}")
    ((${#names[@]})) || { pt_say "no submodules under third_party/ in HEAD"; exit 0; }
  else
    if [[ -d $ROOT/patches ]]; then
      while IFS= read -r d; do names+=("$(basename "$d")"); done \
        < <(find "$ROOT/patches" -mindepth 1 -maxdepth 1 -type d ! -name '.*' | LC_ALL=C sort)
    fi
    if ((${#names[@]} == 0)); then
      pt_say "no patch series under patches/ yet (expected patches/<Name>/000N-*.patch); nothing to do"
      exit 0
    fi
    for n in "${names[@]}"; do
      if ! pt_valid_name "$n" || [[ -z $(pt_pin "$ROOT" "$n") ]]; then
        pt_err "patches/$n/ has no submodule third_party/$n in HEAD (known: ${GITLINKS[*]:-none}); rename or remove it"
        exit "$PT_USAGE"
      fi
    done
  fi
fi

# Signals only set a flag here; the loop below stops at the next submodule boundary.
interrupted=''
trap 'interrupted=1' INT TERM HUP
pt_tmp_init
status=0
note() { ((status)) || status=$1; }

# handle NAME: one submodule; returns its exit code.
handle() {
  local name=$1 sub="$ROOT/third_party/$1" pin head
  local -a series
  pin=$(pt_pin "$ROOT" "$name")
  mapfile -t series < <(pt_series "$ROOT" "$name")
  local stray
  stray=$(pt_stray "$ROOT" "$name")
  if [[ -n $stray && $mode != status ]]; then
    pt_err "$name: ignoring misnamed patch file(s) (expected 000N-<slug>.patch): ${stray//$'\n'/ }"
  fi

  if [[ $mode == status ]]; then status_line "$name" "$sub" "$pin" "${series[@]}"; return 0; fi

  if ((${#series[@]} == 0)); then
    pt_say "$name: no patch series (patches/$name/ has no 000N-*.patch files); nothing to do"
    return 0
  fi
  if ! pt_populated "$sub"; then
    pt_err "$name: third_party/$name is not populated; skipped. Populate it with"
    pt_err "    git submodule update --init third_party/$name"
    pt_err "  (offline: clone it from a local copy of its repository, then check out the pin the superproject records)"
    return "$PT_UNPOPULATED"
  fi
  pt_enter "$sub"
  if ! pt_g cat-file -e "$pin^{commit}" 2>/dev/null; then
    pt_err "$name: the pinned commit $pin is not in third_party/$name; fetch it (git -C third_party/$name fetch) or run git submodule update third_party/$name"
    return "$PT_NOT_AT_PIN"
  fi
  local t_pin t_app
  t_pin=$(pt_g rev-parse "$pin^{tree}")
  if pt_series_tree "$pin" "${series[@]}"; then
    t_app=$PT_TREE
  else
    pt_err "$name: the series does not apply at the pin $(pt_short "$pin"); nothing was changed."
    pt_err "$PT_WHY"
    pt_err "  fix the patch (see patches/README.md: git am in a scratch clone, rebase, scripts/refresh_patches.sh $name)"
    return "$PT_NO_APPLY"
  fi
  if [[ $mode == record ]]; then
    pt_write_record "$ROOT" "$name" "$pin" "$t_app"
    pt_say "$name: recorded patches/$name/series.tree (${#series[@]} patch(es) at the pin $(pt_short "$pin") give tree $(pt_short "$t_app"))"
    return 0
  fi
  local verified=0
  pt_verify_record "$ROOT" "$name" "$pin" "$t_app" || verified=$?
  if ((verified == 1)) || { ((verified == 2)) && [[ $mode != check ]]; }; then
    pt_err "$name: $PT_WHY; nothing was changed."
    return "$PT_NO_APPLY"
  fi
  if [[ $mode == check ]]; then
    pt_say "$name: ${#series[@]} patch(es) apply cleanly at the pin $(pt_short "$pin")"
    ((verified == 0)) || pt_say "$name: note: $PT_WHY"
    return 0
  fi

  head=$(git -C "$sub" rev-parse HEAD)
  if [[ $head != "$pin" ]]; then
    pt_err "$name: third_party/$name HEAD is $head but the superproject pins $pin; refusing."
    if git -C "$sub" merge-base --is-ancestor "$pin" "$head" 2>/dev/null; then
      pt_err "  HEAD has commits on top of the pin: turn them into patches with scripts/refresh_patches.sh $name, then"
    fi
    pt_err "  check out the pin: git -C third_party/$name checkout $pin   (or: git submodule update third_party/$name)"
    return "$PT_NOT_AT_PIN"
  fi
  if [[ $t_app == "$t_pin" ]]; then
    pt_say "$name: the series makes no net change; nothing to do"
    return 0
  fi

  local t_wt
  t_wt=$(pt_worktree_tree "$t_pin" "$t_app")
  local from to verb
  if [[ $mode == apply ]]; then
    if [[ $t_wt == "$t_app" ]]; then pt_say "$name: already applied (${#series[@]} patch(es))"; return 0; fi
    from=$t_pin to=$t_app verb=applied
  else
    if [[ $t_wt == "$t_pin" ]]; then pt_say "$name: not applied (working tree is at the pin); nothing to reverse"; return 0; fi
    from=$t_app to=$t_pin verb=reversed
  fi
  if [[ $t_wt != "$from" ]]; then
    report_dirty "$name" "$t_pin" "$t_app" "$t_wt"
    return "$PT_DIRTY"
  fi

  # A sparse checkout (populate-third-party leaves out blobs a snapshot lacks) may omit a file we patch.
  local -a absent=()
  local path
  while IFS= read -r -d '' path; do
    [[ -e $sub/$path || -L $sub/$path ]] || absent+=("$path")
  done < <(pt_g diff-tree -r -z --name-only --no-renames --diff-filter=MDT "$t_pin" "$t_app")
  if ((${#absent[@]})) && [[ $mode == apply ]]; then
    pt_err "$name: the series changes files missing from the checkout of third_party/$name (sparse checkout?):"
    for path in "${absent[@]:0:10}"; do pt_err "    $path"; done
    pt_err "  check them out (git -C third_party/$name sparse-checkout disable, which needs their blobs); nothing was changed"
    return 1
  fi

  pt_write_diff "$from" "$to" "$PT_WORK/net.diff"
  # From here on the working tree changes: ignore interrupts (git inherits this) so that it is never left
  # half-written. The caller sees the signal once this subshell has finished, and reports our outcome.
  trap '' INT TERM HUP
  local err
  if ! err=$(git -C "$sub" apply --whitespace=nowarn "$PT_WORK/net.diff" 2>&1); then
    # git apply is atomic: a failure here leaves every file as it was.
    pt_err "$name: git apply failed unexpectedly; nothing was changed:"$'\n'"$err"
    return 1
  fi
  t_wt=$(pt_worktree_tree "$t_pin" "$t_app")
  if [[ $t_wt != "$to" ]]; then
    pt_err "$name: after git apply the working tree ($t_wt) is not the expected tree ($to); inspect git -C third_party/$name status"
    return 1
  fi
  pt_say "$name: $verb ${#series[@]} patch(es) at $(pt_short "$pin")"
  for p in "${series[@]}"; do pt_say "    $(basename "$p")"; done
  return 0
}

report_dirty() {
  local name=$1 t_pin=$2 t_app=$3 t_wt=$4 line
  pt_err "$name: third_party/$name has local changes: its working tree is neither the pin nor exactly the"
  pt_err "  applied state of patches/$name/; refusing to touch it. Paths that differ from the pin:"
  local -a lines
  mapfile -t lines < <(pt_g diff-tree -r --name-status --no-renames "$t_pin" "$t_wt")
  for line in "${lines[@]:0:20}"; do pt_err "    $line"; done
  ((${#lines[@]} <= 20)) || pt_err "    ... ($((${#lines[@]} - 20)) more)"
  mapfile -t lines < <(pt_g diff-tree -r --name-status --no-renames "$t_app" "$t_wt")
  pt_err "  and from the applied state:"
  for line in "${lines[@]:0:20}"; do pt_err "    $line"; done
  ((${#lines[@]} <= 20)) || pt_err "    ... ($((${#lines[@]} - 20)) more)"
  pt_err "  keep the changes as a patch (patches/README.md), or discard them (destroys them):"
  pt_err "    git -C third_party/$name checkout -- . && git -C third_party/$name clean -fd"
  # Files the series creates may be ignored by upstream's .gitignore, which `clean -fd` keeps.
  local -a created=()
  while IFS= read -r -d '' line; do
    [[ -e "$ROOT/third_party/$name/$line" ]] && created+=("third_party/$name/$line")
  done < <(pt_g diff-tree -r -z --name-only --no-renames --diff-filter=A "$t_pin" "$t_app")
  ((${#created[@]} == 0)) || pt_err "    rm -f -- ${created[*]}"
}

status_line() {
  local name=$1 sub=$2 pin=$3
  shift 3
  local -a series=("$@")
  local populated=no atpin=- applied=- dirty=- head
  if pt_populated "$sub"; then
    populated=yes
    pt_enter "$sub"
    head=$(git -C "$sub" rev-parse HEAD)
    local t_pin t_app t_wt t_head
    if [[ $head == "$pin" ]]; then atpin=yes; else atpin="no(HEAD=$(pt_short "$head"),pin=$(pt_short "$pin"))"; fi
    if pt_g cat-file -e "$pin^{commit}" 2>/dev/null; then
      t_pin=$(pt_g rev-parse "$pin^{tree}")
      if ((${#series[@]} == 0)); then
        applied=n/a t_app=$t_pin
      elif pt_series_tree "$pin" "${series[@]}"; then
        t_app=$PT_TREE
        if ! pt_verify_record "$ROOT" "$name" "$pin" "$t_app"; then
          applied="broken(not-the-recorded-result)"
        fi
      else
        applied="broken(series-does-not-apply)" t_app=$t_pin
      fi
    else
      t_pin=$(pt_g rev-parse "$head^{tree}") t_app=$t_pin
    fi
    t_wt=$(pt_worktree_tree "$t_pin" "$t_app")
    if [[ $atpin == yes ]]; then
      if [[ $applied == - ]]; then
        if [[ $t_wt == "$t_app" ]]; then applied=yes; else applied=no; fi
      fi
      if [[ $t_wt == "$t_pin" || $t_wt == "$t_app" ]]; then dirty=no; else dirty=yes; fi
    else
      t_head=$(pt_g rev-parse "$head^{tree}")
      [[ $applied == - ]] && applied=no
      if [[ $t_wt == "$t_head" ]]; then dirty=no; else dirty=yes; fi
    fi
  fi
  printf '%-12s populated=%s at-pin=%s applied=%s dirty=%s patches=%d\n' \
    "$name" "$populated" "$atpin" "$applied" "$dirty" "${#series[@]}"
}

# report_interrupt NAME RC REST...: what an interrupt left behind; NAME is the submodule being handled.
report_interrupt() {
  local name=$1 rc=$2
  shift 2
  if [[ -n $name ]]; then
    if ((rc == 0)); then
      pt_err "interrupted: $name had already reached its final state (see above) when the signal came"
    elif [[ $mode == apply || $mode == reverse ]]; then
      pt_err "interrupted: third_party/$name was left as it was (nothing changed)"
    else
      pt_err "interrupted while handling $name (this mode changes no submodule)"
    fi
  else
    pt_err "interrupted before any submodule was handled"
  fi
  (($# == 0)) || pt_err "interrupted: not handled, left as they were: $*"
}

for i in "${!names[@]}"; do
  n=${names[$i]}
  if [[ -n $interrupted ]]; then report_interrupt '' 0 "${names[@]:i}"; exit 130; fi
  # A subshell keeps `set -e` active inside handle (it would be ignored in `handle || ...`); it dies on
  # a signal except while it writes the working tree (see handle).
  set +e
  (set -e; trap 'exit 130' INT TERM HUP; handle "$n")
  rc=$?
  set -e
  # Our stdout was closed (e.g. `--status | head -1`): stop quietly, like any filter.
  ((rc != 141)) || exit 141
  if [[ -n $interrupted ]]; then report_interrupt "$n" "$rc" "${names[@]:i+1}"; exit 130; fi
  if ((rc > PT_NO_APPLY)); then
    pt_err "$n: unexpected error (exit $rc) while handling third_party/$n; see the git message above"
    rc=1
  fi
  note "$rc"
done
exit "$status"
