# Shared by scripts/run_<method>.sh and scripts/slurm/* (source it; do not run it). One call does a whole
# evaluation on one node, one chunk per GPU:
#
#   run_method <method> <EnvName>
#
# Knobs (environment variables):
#   CKPT         checkpoint folder or hub id          default liuhaotian/llava-v1.5-7b
#   DATA_DIR     LLaVA's playground/data/eval         default <repo>/playground/data/eval
#   BENCHMARKS   space- or comma-separated            default the paper's ten:
#                gqa mmbench mmbench_cn mme mmvet pope scienceqa textvqa vizwiz vqav2   (also: seed)
#   MODES        debias modes                         default "off full"
#   TREND        positional trend for pos/full        default the paper preset paper:<method>/<benchmark>
#                                                     (FastV: paper:fastv); calibrated:<file> for a fitted one
#   METHOD_ARGS  budgets/overrides, "key=value ..."   e.g. METHOD_ARGS="fast_v_attention_rank=64"
#   GPUS         comma-separated GPU ids, one chunk per GPU   default $CUDA_VISIBLE_DEVICES or 0
#   ANSWERS_DIR  where answers go                     default <repo>/outputs/answers
#   LIMIT        only the first N questions (smoke tests)
#   MAX_NEW_TOKENS  override LLaVA's per-module default (128 / 1024)
#   PYTHON       interpreter to use                   default the method's environment (see method_python)
#
# Every check runs before any GPU work: a missing environment, checkpoint or dataset folder stops the
# script with one line naming the path and how to get it (exit 2). Nothing is skipped silently.
# Paths must not contain spaces.

EVAL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PAPER_BENCHMARKS="gqa mmbench mmbench_cn mme mmvet pope scienceqa textvqa vizwiz vqav2"

die() { echo "error: $*" >&2; exit 2; }

# Arguments every run of a method gets. The visual span starts at token 35 for LLaVA-1.5 vicuna_v1; the
# official repo passed 36 to FastV and TokenCarve (off by one), so the sys length is always passed explicitly.
method_fixed_args() {
  case $1 in
    fastv) echo "--method-arg fast_v_sys_length=35" ;;
    himap) echo "--method-arg sys_length=35" ;;
    tokencarve) echo "--method-arg token_carve_sys_length=35" ;;
  esac
}

# The interpreter of environment <EnvName>: $PYTHON, else envs/venv-<Env>, envs/conda-<Env> (setup.sh),
# else the CPU test environment .venv-<Env>.
method_python() {
  local env=$1 cand
  if [[ -n ${PYTHON:-} ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON is not an executable"
    echo "$PYTHON"; return
  fi
  for cand in "$EVAL_ROOT/envs/venv-$env/bin/python" "$EVAL_ROOT/envs/conda-$env/bin/python" \
              "$EVAL_ROOT/.venv-$env/bin/python"; do
    [[ -x $cand ]] && { echo "$cand"; return; }
  done
  die "no environment for $env: $EVAL_ROOT/envs/venv-$env (or envs/conda-$env) does not exist; build it with: bash setup.sh --only $env (or set PYTHON=...)"
}

# A local checkpoint path must exist; a hub id is checked by the driver (offline: must be in the HF cache).
check_checkpoint() {
  local ckpt=$1
  [[ -e $ckpt ]] && return
  [[ $ckpt =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$ ]] && return
  die "checkpoint $ckpt does not exist; set CKPT to a LLaVA-1.5 folder or a hub id (default liuhaotian/llava-v1.5-7b)"
}

check_data_dir() {
  [[ -d $1 ]] || die "dataset folder DATA_DIR=$1 does not exist; download LLaVA's eval data (third_party/LLaVA/docs/Evaluation.md: eval.zip and each benchmark's images) there, or set DATA_DIR"
}

_csv() { echo "$1" | tr ' ' ',' | sed 's/,,*/,/g; s/^,//; s/,$//'; }

# Sets EVAL_ARGS (the driver's arguments from the knobs, chunking excluded) after checking checkpoint and data.
eval_args() {
  local method=$1 ckpt data extra
  ckpt=${CKPT:-liuhaotian/llava-v1.5-7b}
  data=${DATA_DIR:-$EVAL_ROOT/playground/data/eval}
  check_checkpoint "$ckpt"
  check_data_dir "$data"
  EVAL_ARGS=(--method "$method" --benchmark "$(_csv "${BENCHMARKS:-$PAPER_BENCHMARKS}")"
             --mode "$(_csv "${MODES:-off full}")" --model-path "$ckpt" --data-dir "$data"
             --answers-dir "${ANSWERS_DIR:-$EVAL_ROOT/outputs/answers}" $(method_fixed_args "$method"))
  for extra in ${METHOD_ARGS:-}; do EVAL_ARGS+=(--method-arg "$extra"); done
  [[ -n ${TREND:-} ]] && EVAL_ARGS+=(--trend "$TREND")
  [[ -n ${LIMIT:-} ]] && EVAL_ARGS+=(--limit "$LIMIT")
  [[ -n ${MAX_NEW_TOKENS:-} ]] && EVAL_ARGS+=(--max-new-tokens "$MAX_NEW_TOKENS")
  return 0
}

# merge_and_score <python> <num chunks> <run folders, one per line>: returns 1 if any step failed.
merge_and_score() {
  local py=$1 n=$2 dirs=$3 d failed=0
  while IFS= read -r d; do
    [[ -n $d ]] || continue
    if [[ $n -gt 1 ]]; then
      "$py" -m eval.merge --run-dir "$d" >/dev/null || { failed=1; continue; }
    fi
    "$py" -m eval.score --run-dir "$d" || failed=1
  done <<<"$dirs"
  return $failed
}

run_method() {
  local method=$1 env=$2 py gpus n k rc failed=0 dirs
  py=$(method_python "$env") || exit 2
  eval_args "$method"
  IFS=',' read -ra gpus <<<"${GPUS:-${CUDA_VISIBLE_DEVICES:-0}}"
  n=${#gpus[@]}
  cd "$EVAL_ROOT" || exit 2
  export PYTHONPATH="$EVAL_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  dirs=$("$py" -m eval.run "${EVAL_ARGS[@]}" --num-chunks "$n" --check-only) || exit 2
  echo "== $method ($py): $n chunk(s) on GPU(s) ${gpus[*]}"

  # Chunk 0 reports on the terminal; the others write to a log each (named here).
  local pids=() logs=()
  for k in $(seq 0 $((n - 1))); do
    logs[k]=$(mktemp "${TMPDIR:-/tmp}/eval-$method-chunk$k.XXXX.log")
    if [[ $k -eq 0 ]]; then
      CUDA_VISIBLE_DEVICES=${gpus[k]} "$py" -m eval.run "${EVAL_ARGS[@]}" --num-chunks "$n" --chunk-idx "$k" \
        >"${logs[k]}" &
    else
      echo "   chunk $k on GPU ${gpus[k]}: log ${logs[k]}"
      CUDA_VISIBLE_DEVICES=${gpus[k]} "$py" -m eval.run "${EVAL_ARGS[@]}" --num-chunks "$n" --chunk-idx "$k" \
        >"${logs[k]}" 2>&1 &
    fi
    pids[k]=$!
  done
  for k in "${!pids[@]}"; do
    wait "${pids[k]}"; rc=$?
    if [[ $rc -eq 0 ]]; then
      rm -f "${logs[k]}"
    else
      echo "error: chunk $k on GPU ${gpus[k]} failed (exit $rc, log ${logs[k]}); rerun the same command to resume" >&2
      failed=1
    fi
  done
  [[ $failed -eq 0 ]] || exit 1
  merge_and_score "$py" "$n" "$dirs" || failed=1
  echo "== answers and score.json under ${ANSWERS_DIR:-$EVAL_ROOT/outputs/answers}; table: python -m eval.report"
  return $failed
}
