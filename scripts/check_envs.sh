#!/usr/bin/env bash
# Maintainer check (needs network; not part of CI): does each GPU requirement list envs/<Name>.txt resolve
# for Python 3.10 on linux x86_64, and is the torch it resolves a CUDA >= 11.8 build (one with sm_90 code,
# so it runs on Hopper as well as Ampere)? For each list:
#   a fresh python3.10 venv (kept in a temporary folder), pip upgraded, then
#   pip install --dry-run --ignore-installed --report <json> -r <the list as setup.sh installs it>
# where, as in setup.sh, `-e third_party/...` lines become plain installs of temporary copies (pip prepares
# their metadata in the source tree, which must not write into a submodule) and lines marked
# "# no-deps:" or naming flash-attn/deepspeed are left out (they do not choose torch). The torch chosen
# must be version 2.x with a local tag +cuNNN >= 118 or depend on nvidia-cuda-runtime-cuNN >= 11.8
# (PyPI's Linux wheels: torch 2.0.1 -> cu11 11.7, no sm_90; 2.1+ -> cu12).
#
#   bash scripts/check_envs.sh [NAME ...]      default: every envs/<Name>.txt but test and analysis
#   PYTHON310=/path/to/python3.10              interpreter for the venvs (default python3.10)
# Prints one line per list: "ok   <Name>: torch <version> (<CUDA build>)" or "FAIL <Name>: <why>".
# Exit codes: 0 every list resolves to a Hopper-capable torch; 1 some list does not; 2 usage or no python3.10.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY310=${PYTHON310:-python3.10}
command -v "$PY310" >/dev/null 2>&1 || { echo "error: $PY310 not found; set PYTHON310 to a Python 3.10 interpreter" >&2; exit 2; }
[[ $("$PY310" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) == 3.10 ]] \
  || { echo "error: $PY310 is not Python 3.10; set PYTHON310" >&2; exit 2; }
[[ $(uname -sm) == "Linux x86_64" ]] || echo "warning: this is not linux x86_64; wheels resolve for $(uname -sm)" >&2

names=("$@")
if ((${#names[@]} == 0)); then
  for f in envs/*.txt; do
    n=$(basename "$f" .txt)
    [[ $n == test || $n == analysis ]] || names+=("$n")
  done
fi
for n in "${names[@]}"; do
  [[ -f envs/$n.txt ]] || { echo "error: no envs/$n.txt" >&2; exit 2; }
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/check-envs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM HUP

"$PY310" -m venv "$tmp/venv" || { echo "error: $PY310 -m venv failed" >&2; exit 2; }
"$tmp/venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 \
  || { echo "error: could not upgrade pip in a fresh venv (network?)" >&2; exit 2; }

# list_for_resolution REQ OUT: the lines that choose torch, with local editables replaced by copies.
list_for_resolution() {
  local line path copy
  : > "$2"
  while IFS= read -r line || [[ -n $line ]]; do
    [[ $line =~ \#[[:space:]]*no-deps: ]] && continue
    [[ $line =~ ^[[:space:]]*(flash[-_]attn|deepspeed)([^A-Za-z0-9_.-]|$) ]] && continue
    if [[ $line =~ ^[[:space:]]*-e[[:space:]]+(third_party/[^[:space:]#]+) ]]; then
      path=${BASH_REMATCH[1]}
      [[ -d $path ]] || { echo "$path is not populated (git submodule update --init)" > "$2.why"; return 1; }
      copy="$tmp/copies/${path//\//_}"
      mkdir -p "$copy" && cp -a "$path/." "$copy/"
      printf '%s\n' "$copy" >> "$2"
      continue
    fi
    printf '%s\n' "$line" >> "$2"
  done < "$1"
}

failed=0
for n in "${names[@]}"; do
  list="$tmp/$n.txt" report="$tmp/$n.json"
  if ! list_for_resolution "envs/$n.txt" "$list"; then
    echo "FAIL $n: $(cat "$list.why")"; failed=1; continue
  fi
  if ! "$tmp/venv/bin/python" -m pip install -q --dry-run --ignore-installed --report "$report" -r "$list" \
       >"$tmp/$n.log" 2>&1; then
    echo "FAIL $n: pip could not resolve envs/$n.txt: $(grep -E 'ERROR|error:' "$tmp/$n.log" | head -n 2 | tr '\n' ' ')"
    failed=1; continue
  fi
  verdict=$("$tmp/venv/bin/python" - "$report" 2>&1 <<'PY'
import json, re, sys
items = json.load(open(sys.argv[1]))["install"]
torch = [i for i in items if i["metadata"]["name"].lower() == "torch"]
if not torch:
    sys.exit("FAIL: the list installs no torch")
meta = torch[0]["metadata"]
version = meta["version"]
local = re.search(r"\+cu(\d+)$", version)
if local:
    cuda = (int(local.group(1)[:-1]), int(local.group(1)[-1]))
else:
    runtime = [r for r in meta.get("requires_dist") or [] if r.startswith("nvidia-cuda-runtime-cu")]
    m = re.search(r"==\s*(\d+)\.(\d+)", runtime[0]) if runtime else None
    if not m:
        sys.exit(f"FAIL: torch {version} is not a CUDA build (no +cuNNN tag, no nvidia-cuda-runtime dependency)")
    cuda = (int(m.group(1)), int(m.group(2)))
if cuda < (11, 8):
    sys.exit(f"FAIL: torch {version} is built for CUDA {cuda[0]}.{cuda[1]}, which has no sm_90 (Hopper) code; "
             f"use a CUDA >= 11.8 build")
print(f"torch {version} (CUDA {cuda[0]}.{cuda[1]} build: sm_90 capable), from {torch[0]['download_info']['url']}")
PY
  ) || { echo "FAIL $n: ${verdict#FAIL: }"; failed=1; continue; }
  echo "ok   $n: $verdict"
done
exit $failed
