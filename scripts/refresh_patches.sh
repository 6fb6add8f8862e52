#!/usr/bin/env bash
# Maintainer tool: regenerate patches/<Name>/ from commits made on top of the pinned submodule commit
# (like ungoogled-chromium's devutils/update_patches.py). Run with --help for usage and exit codes.
#
# Workflow (also in patches/README.md):
#   pin=$(git ls-tree HEAD third_party/FastV | awk '{print $3}')
#   git clone -q --shared third_party/FastV /tmp/FastV-work
#   git -C /tmp/FastV-work checkout -q -b debias "$pin"
#   git -C /tmp/FastV-work am "$PWD"/patches/FastV/*.patch      # replay the current series (if any)
#   ... edit, then commit one purpose per commit (git commit, git commit --amend, git rebase -i "$pin");
#       author "debias maintainers <debias@localhost>"; subject = what, body = why
#   scripts/refresh_patches.sh FastV --from /tmp/FastV-work     # rewrite patches/FastV/, print what changed
#   scripts/apply_patches.sh --check FastV                       # the series applies at the pin
#
# Output is stable, so re-running on the same commits rewrites nothing and `git diff patches/` shows only
# real changes: no From <sha> line (all zeros), no "[PATCH n/m]" numbering, no signature (git version),
# full blob ids in index lines (abbreviations depend on the repository), no rename detection, and the
# user's global/system git config is ignored while formatting.
set -euo pipefail

PT_PROG=refresh_patches.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/patches.sh
. "$SCRIPT_DIR/lib/patches.sh"
PT_WOULD_CHANGE=7

usage() {
  cat <<'EOF'
usage: scripts/refresh_patches.sh NAME [--from DIR | --from REV] [--dry-run]

Regenerates patches/NAME/000N-<slug>.patch from the commits between the pinned commit of
third_party/NAME (the superproject's gitlink) and a tip, with `git format-patch` in a stable form.
Stale patch files (numbers or subjects that no longer exist) are removed; other files in patches/NAME/
are left alone. Prints one line per patch file: added, updated, unchanged or removed.

  (default)     the tip is HEAD of third_party/NAME, which must have commits on top of the pin
  --from DIR    the tip is HEAD of the git repository DIR (e.g. a scratch clone, see patches/README.md)
  --from REV    the tip is REV (a branch, tag or sha) in third_party/NAME
  --dry-run     write nothing; exit 0 if patches/NAME/ is up to date, 7 if it would change
  -h, --help    this text

The tip must descend from the pin with at least one commit and no merge commits on top. Uncommitted
changes in the source are not exported (a warning says so). After writing, the series is checked with
scripts/apply_patches.sh --check NAME when third_party/NAME is populated.

Exit codes:
  0  patches/NAME/ written (or already up to date)
  1  unexpected error, or the regenerated series fails apply_patches.sh --check
  2  usage: bad option, unknown NAME
  3  the source repository is missing or not populated
  4  the pinned commit is not in the source, or the tip does not descend from it
  5  no commits on top of the pin, or merge commits in pin..tip
  7  --dry-run only: patches/NAME/ would change
EOF
}

name='' from='' dry=0
while (($#)); do
  case $1 in
    --from) (($# >= 2)) || { pt_err "--from needs a directory or a revision"; exit "$PT_USAGE"; }; from=$2; shift ;;
    --from=*) from=${1#--from=} ;;
    --dry-run) dry=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) pt_err "unknown option '$1' (see --help)"; exit "$PT_USAGE" ;;
    *) [[ -z $name ]] || { pt_err "only one NAME at a time (got '$name' and '$1')"; exit "$PT_USAGE"; }; name=$1 ;;
  esac
  shift
done
[[ -n $name ]] || { usage >&2; exit "$PT_USAGE"; }

pt_clean_git_env
ROOT=$(pt_repo_root "$SCRIPT_DIR")
pt_valid_name "$name" || pt_die "$PT_USAGE" "invalid submodule name '$name' (expected e.g. FastV)"
pin=$(pt_pin "$ROOT" "$name")
if [[ -z $pin ]]; then
  mapfile -t known < <(pt_gitlinks "$ROOT")
  pt_die "$PT_USAGE" "unknown submodule '$name': HEAD has no gitlink third_party/$name; known: ${known[*]:-none}"
fi
sub="$ROOT/third_party/$name"

# Resolve the source repository and the tip revision.
rev=HEAD
if [[ -n $from && -d $from ]]; then
  src=$(cd "$from" && pwd)
  git -C "$src" rev-parse --git-dir >/dev/null 2>&1 || pt_die "$PT_UNPOPULATED" "--from $from is a directory but not a git repository"
  src_label=$from
else
  pt_populated "$sub" || pt_die "$PT_UNPOPULATED" "third_party/$name is not populated; pass --from <scratch clone>, or run git submodule update --init third_party/$name"
  src=$sub src_label="third_party/$name"
  if [[ -n $from ]]; then rev=$from; src_label="$src_label $from"; fi
fi
tip=$(git -C "$src" rev-parse -q --verify "$rev^{commit}") \
  || pt_die "$PT_UNPOPULATED" "'$rev' is not a commit in $src_label (a path given to --from must exist; a revision must exist in third_party/$name)"
git -C "$src" cat-file -e "$pin^{commit}" 2>/dev/null \
  || pt_die "$PT_NOT_AT_PIN" "the pinned commit $pin is not in $src_label; fetch it there first"
git -C "$src" merge-base --is-ancestor "$pin" "$tip" \
  || pt_die "$PT_NOT_AT_PIN" "$src_label tip $tip does not descend from the pin $pin; rebase the work onto the pin (git rebase --onto $pin ...)"
count=$(git -C "$src" rev-list --count "$pin..$tip")
((count > 0)) || pt_die 5 "$src_label has no commits on top of the pin $pin: commit the changes first (see patches/README.md)"
merges=$(git -C "$src" rev-list --merges "$pin..$tip")
[[ -z $merges ]] || pt_die 5 "merge commits in $pin..$tip ($(echo "$merges" | head -3 | tr '\n' ' ')); linearise with git rebase $pin"
if [[ $rev == HEAD ]] && git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1 \
   && [[ -n $(git -C "$src" status --porcelain --untracked-files=no) ]]; then
  pt_err "warning: $src_label has uncommitted changes; they are not in the regenerated patches"
fi

pt_tmp_init
out="$PT_TMP/out"
mkdir -p "$out"
GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null git -C "$src" format-patch -q \
  --no-signature --zero-commit --no-numbered --subject-prefix=PATCH --no-cover-letter --no-thread \
  --full-index --no-renames --binary --start-number=1 -o "$out" "$pin..$tip"

dest="$ROOT/patches/$name"
changed=0
declare -A fresh=()
pt_say "patches/$name/ from $src_label ($count commit(s) on top of $(pt_short "$pin")):"
while IFS= read -r f; do
  b=$(basename "$f")
  fresh[$b]=1
  if [[ ! -f $dest/$b ]]; then
    pt_say "  added     $b"; changed=1
  elif cmp -s "$f" "$dest/$b"; then
    pt_say "  unchanged $b"
  else
    pt_say "  updated   $b"; changed=1
  fi
done < <(find "$out" -maxdepth 1 -type f -name '*.patch' | LC_ALL=C sort)
stale=()
while IFS= read -r f; do
  b=$(basename "$f")
  if [[ -z ${fresh[$b]:-} ]]; then pt_say "  removed   $b"; stale+=("$f"); changed=1; fi
done < <(pt_series "$ROOT" "$name")

if ((dry)); then
  if ((changed)); then pt_say "dry run: patches/$name/ would change"; exit "$PT_WOULD_CHANGE"; fi
  pt_say "dry run: patches/$name/ is up to date"; exit 0
fi
if ((!changed)); then pt_say "patches/$name/ is up to date"; exit 0; fi

mkdir -p "$dest"
((${#stale[@]} == 0)) || rm -f -- "${stale[@]}"
while IFS= read -r f; do
  b=$(basename "$f")
  cmp -s "$f" "$dest/$b" 2>/dev/null || cp "$f" "$dest/$b"
done < <(find "$out" -maxdepth 1 -type f -name '*.patch' | LC_ALL=C sort)
pt_say "wrote patches/$name/ ($count patch file(s)); review with: git diff --stat -- patches/$name"

if pt_populated "$sub"; then
  if ! bash "$SCRIPT_DIR/apply_patches.sh" --record "$name"; then
    pt_err "the regenerated series does not apply at the pin; see the message above"
    exit 1
  fi
else
  pt_say "third_party/$name is not populated: the series was neither checked nor recorded (scripts/apply_patches.sh --record $name once populated)"
fi
