# shellcheck shell=bash disable=SC2034
# Functions shared by scripts/apply_patches.sh and scripts/refresh_patches.sh (source this file).
#
# Everything here is prefixed pt_ (functions) or PT_ (variables) and changes no shell option.
# State checks never write to a submodule: every object git creates while we compute trees (temporary
# indexes, `git apply --cached`, `git add`) goes to a temporary object directory that borrows the
# submodule's objects as an alternate, and every index involved is a temporary copy.

# Exit codes (documented in both scripts' --help).
PT_OK=0 PT_USAGE=2 PT_UNPOPULATED=3 PT_NOT_AT_PIN=4 PT_DIRTY=5 PT_NO_APPLY=6

# Variables inherited from a git hook or a wrapper would point git at the wrong repository.
pt_clean_git_env() {
  unset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE GIT_OBJECT_DIRECTORY GIT_ALTERNATE_OBJECT_DIRECTORIES \
        GIT_COMMON_DIR GIT_PREFIX GIT_NAMESPACE GIT_CEILING_DIRECTORIES
}

pt_die() { local code=$1; shift; printf '%s: error: %s\n' "$PT_PROG" "$*" >&2; exit "$code"; }
pt_err() { printf '%s: %s\n' "$PT_PROG" "$*" >&2; }
pt_say() { printf '%s\n' "$*"; }

# pt_repo_root DIR: top of the git work tree holding DIR (the project; scripts live in <root>/scripts).
pt_repo_root() {
  local top
  top=$(git -C "$1" rev-parse --show-toplevel 2>/dev/null) \
    || pt_die 1 "$1 is not inside a git work tree; run this script from a clone of the project"
  printf '%s\n' "$top"
}

pt_valid_name() { [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; }

# pt_pin ROOT NAME: the gitlink sha of third_party/NAME in the superproject's HEAD (empty if none).
pt_pin() {
  git -C "$1" ls-tree HEAD -- "third_party/$2" 2>/dev/null | awk '$1 == "160000" && $2 == "commit" { print $3 }'
}

# pt_gitlinks ROOT: names of every gitlink directly under third_party/ in HEAD, sorted.
pt_gitlinks() {
  git -C "$1" ls-tree HEAD -- third_party/ 2>/dev/null \
    | awk -F '\t' '{ split($1, m, " "); if (m[1] == "160000") { sub("^third_party/", "", $2); print $2 } }' | LC_ALL=C sort
}

# pt_populated DIR: DIR is the top of its own git work tree (not an empty folder inside the superproject).
pt_populated() {
  [[ -e "$1/.git" ]] || return 1
  local top phys
  top=$(git -C "$1" rev-parse --show-toplevel 2>/dev/null) || return 1
  phys=$(cd "$1" && pwd -P)
  [[ "$top" == "$phys" ]] && git -C "$1" rev-parse -q --verify HEAD >/dev/null
}

# pt_series ROOT NAME: patches/NAME/000N-*.patch (any 4 digits), in file order, one absolute path a line.
pt_series() {
  local dir="$1/patches/$2"
  [[ -d $dir ]] || return 0
  find "$dir" -maxdepth 1 -type f -name '[0-9][0-9][0-9][0-9]-*.patch' | LC_ALL=C sort
}

# pt_stray ROOT NAME: *.patch files in patches/NAME/ that pt_series ignores (misnamed).
pt_stray() {
  local dir="$1/patches/$2"
  [[ -d $dir ]] || return 0
  find "$dir" -maxdepth 1 -name '*.patch' ! -name '[0-9][0-9][0-9][0-9]-*.patch' -exec basename {} \; | LC_ALL=C sort
}

pt_short() { printf '%s' "${1:0:12}"; }

# --- per-submodule scratch state -------------------------------------------------------------------

# pt_tmp_init: one scratch directory per script run, removed on exit (including an exit on a signal the
# caller traps; set such traps before calling this, so no signal can arrive between mktemp and the trap).
pt_tmp_init() {
  PT_TMP=$(mktemp -d "${TMPDIR:-/tmp}/patches.XXXXXX")
  trap 'rm -rf "$PT_TMP"' EXIT
}

# pt_enter SUBDIR: select a populated submodule for pt_g and the tree functions below.
pt_enter() {
  PT_SUB=$1
  local objs
  objs=$(cd "$PT_SUB" && git rev-parse --git-path objects)
  [[ $objs == /* ]] || objs="$PT_SUB/$objs"
  PT_SUB_OBJ=$objs
  PT_IDX=$(cd "$PT_SUB" && git rev-parse --git-path index)
  [[ $PT_IDX == /* ]] || PT_IDX="$PT_SUB/$PT_IDX"
  PT_WORK=$(mktemp -d "$PT_TMP/sub.XXXXXX")
  mkdir -p "$PT_WORK/objects/info" "$PT_WORK/objects/pack"
}

# pt_g ARGS...: git in the selected submodule, writing objects only to the scratch object directory.
pt_g() {
  GIT_OBJECT_DIRECTORY="$PT_WORK/objects" GIT_ALTERNATE_OBJECT_DIRECTORIES="$PT_SUB_OBJ" git -C "$PT_SUB" "$@"
}

# pt_series_tree PIN PATCH...: tree of PIN with the patches applied in order, on a temporary index.
# Sets PT_TREE to the tree sha; on failure returns 1 with the reason in PT_WHY (call it directly, not
# in $(...), or PT_WHY is lost).
pt_series_tree() {
  local pin=$1 idx="$PT_WORK/series.index" p err
  shift
  PT_WHY='' PT_TREE=''
  rm -f "$idx"
  if ! err=$(GIT_INDEX_FILE=$idx pt_g read-tree "$pin^{tree}" 2>&1); then
    PT_WHY="cannot read the pinned tree $pin: $err"; return 1
  fi
  for p in "$@"; do
    if ! err=$(GIT_INDEX_FILE=$idx pt_g apply --cached --whitespace=nowarn "$p" 2>&1); then
      PT_WHY="$(basename "$p") does not apply on top of the pin$( [[ $p == "$1" ]] || printf ' plus the patches before it'):"$'\n'"$err"
      return 1
    fi
  done
  PT_TREE=$(GIT_INDEX_FILE=$idx pt_g write-tree --missing-ok 2>&1) || { PT_WHY="git write-tree failed: $PT_TREE"; return 1; }
}

# pt_changed_paths TREE_A TREE_B: paths that differ between two trees (NUL-terminated).
pt_changed_paths() {
  pt_g diff-tree -r -z --name-only --no-renames "$1" "$2"
}

# pt_worktree_tree PIN_TREE APPLIED_TREE: tree of the submodule's working tree as `git add` would record it.
# Starts from a copy of the real index (keeps sparse-checkout skip-worktree entries, whose files are
# absent on purpose), records every tracked change, and force-adds the paths the series touches so that
# files created by patches count even when untracked or ignored. Other untracked files are not part of
# the state: apply and reverse never touch them.
pt_worktree_tree() {
  local idx="$PT_WORK/worktree.index" path
  local -a present=()
  rm -f "$idx"
  if [[ -f $PT_IDX ]]; then cp "$PT_IDX" "$idx"; else GIT_INDEX_FILE=$idx pt_g read-tree HEAD; fi
  GIT_INDEX_FILE=$idx pt_g add -u >/dev/null
  while IFS= read -r -d '' path; do
    if [[ -e "$PT_SUB/$path" || -L "$PT_SUB/$path" ]]; then present+=("$path"); fi
  done < <(pt_changed_paths "$1" "$2")
  if ((${#present[@]})); then
    # Re-hash the series' paths from scratch: a file the series rewrote within the same second as its checkout,
    # with the same size, would otherwise pass git's stat check as unchanged (seen after a fast Ctrl-C rerun).
    GIT_INDEX_FILE=$idx pt_g rm --cached -q --ignore-unmatch -- "${present[@]}" >/dev/null
    GIT_INDEX_FILE=$idx pt_g add -f -- "${present[@]}" >/dev/null
  fi
  GIT_INDEX_FILE=$idx pt_g write-tree --missing-ok
}

# pt_write_diff FROM_TREE TO_TREE FILE: the net change between two trees as one binary-safe patch.
pt_write_diff() {
  pt_g diff-tree -p --binary --full-index --no-renames --no-color "$1" "$2" > "$3"
}

# --- recorded result of a series ------------------------------------------------------------------------
# patches/NAME/series.tree holds what the series must produce: the pinned commit it was recorded for and
# the tree sha of that commit with every patch applied (a patch file truncated or edited by hand applies
# to a different tree, or not at all). `apply_patches.sh --record NAME` writes it.

pt_record_file() { printf '%s/patches/%s/series.tree' "$1" "$2"; }

# pt_read_record ROOT NAME: sets PT_REC_PIN and PT_REC_TREE; returns 1 if the file is missing or malformed.
pt_read_record() {
  local f key val
  f=$(pt_record_file "$1" "$2")
  PT_REC_PIN='' PT_REC_TREE=''
  [[ -f $f ]] || return 1
  while read -r key val; do
    case $key in
      pin) PT_REC_PIN=$val ;;
      tree) PT_REC_TREE=$val ;;
    esac
  done < "$f"
  [[ $PT_REC_PIN =~ ^[0-9a-f]{40}$ && $PT_REC_TREE =~ ^[0-9a-f]{40}$ ]]
}

# pt_write_record ROOT NAME PIN TREE: (re)write patches/NAME/series.tree.
pt_write_record() {
  local f tmp
  f=$(pt_record_file "$1" "$2")
  tmp="$f.tmp.$$"
  {
    printf '# What patches/%s/ must produce: third_party/%s at the pin with every 000N-*.patch applied\n' "$2" "$2"
    printf '# (a git tree sha). Checked by scripts/apply_patches.sh; rewrite with: scripts/apply_patches.sh --record %s\n' "$2"
    printf 'pin %s\ntree %s\n' "$3" "$4"
  } > "$tmp"
  mv -f "$tmp" "$f"
}

# pt_verify_record ROOT NAME PIN TREE: the series' computed TREE is the recorded one. On failure returns 1
# (no record: 2) with the reason in PT_WHY.
pt_verify_record() {
  local root=$1 name=$2 pin=$3 tree=$4 rel
  rel="patches/$name/series.tree"
  PT_WHY=''
  if ! pt_read_record "$root" "$name"; then
    if [[ -f $(pt_record_file "$root" "$name") ]]; then
      PT_WHY="$rel is malformed (expected lines 'pin <sha>' and 'tree <sha>'); restore it with git checkout -- $rel"
      return 1
    fi
    PT_WHY="$rel is missing, so the series' result cannot be verified; restore it (git checkout -- $rel) or, as a maintainer who reviewed the series, record it: scripts/apply_patches.sh --record $name"
    return 2
  fi
  if [[ $PT_REC_PIN != "$pin" ]]; then
    PT_WHY="$rel was recorded for the pin $(pt_short "$PT_REC_PIN"), but the superproject pins $(pt_short "$pin"); after rebasing the series onto the new pin, record it: scripts/apply_patches.sh --record $name"
    return 1
  fi
  if [[ $PT_REC_TREE != "$tree" ]]; then
    PT_WHY="the series applies but does not produce the recorded result ($rel: tree $(pt_short "$PT_REC_TREE"), got $(pt_short "$tree")): a patch file was truncated or edited by hand; restore it with git checkout -- patches/$name/ (maintainers: regenerate with scripts/refresh_patches.sh $name, then scripts/apply_patches.sh --record $name)"
    return 1
  fi
}
