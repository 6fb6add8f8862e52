# Shared by scripts/run_<method>.sh and scripts/slurm/* (source it; do not run it). One call does a whole
# evaluation on one node, one chunk per GPU:
#
#   run_method <method>
#
# Everything about a method (its environment, the arguments always passed) comes from the method registry
# (python -m eval.registry --help); nothing here names a method.
#
# Knobs (environment variables):
#   CKPT         checkpoint folder or hub id          default liuhaotian/llava-v1.5-7b
#                (a hub id must already be in the Hugging Face cache: huggingface-cli download <id>)
#   DATA_DIR     LLaVA's playground/data/eval         default <repo>/playground/data/eval
#   BENCHMARKS   space- or comma-separated            default the paper's ten:
#                gqa mmbench mmbench_cn mme mmvet pope scienceqa textvqa vizwiz vqav2   (also: seed)
#   MODES        debias modes                         default "off full"
#   TREND        positional trend for pos/full        default the paper preset of the method's trend family,
#                                                     paper:<family>/<benchmark> (or paper:<family> where the
#                                                     family has one trend); calibrated:<file> for a fitted one
#   METHOD_ARGS  budgets/overrides, "key=value ..."   e.g. METHOD_ARGS="fast_v_attention_rank=64"
#                (split on whitespace, never glob-expanded)
#   GPUS         comma-separated GPU ids, one chunk per GPU   default $CUDA_VISIBLE_DEVICES or 0
#   ANSWERS_DIR  where answers go                     default <repo>/outputs/answers
#   LIMIT        only the first N questions (smoke tests); a positive integer, and for POPE-format
#                benchmarks large enough that every category scored has an answer (checked up front)
#   MAX_NEW_TOKENS  override LLaVA's per-module default (128 / 1024)
#   PYTHON       interpreter to use                   default the method's environment (see method_python)
#
# Every check runs before any GPU work: a missing environment, checkpoint, dataset folder or file a
# benchmark's scorer needs, or a LIMIT the scorer cannot score, stops the script with one line naming the
# path or value and the fix (exit 2). Nothing is skipped silently. Paths must not contain spaces.

EVAL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PAPER_BENCHMARKS="gqa mmbench mmbench_cn mme mmvet pope scienceqa textvqa vizwiz vqav2"

die() { echo "error: $*" >&2; exit 2; }

# registry ARGS...: python -m eval.registry (any Python 3: it imports only the standard library); exit 2 with
# its one-line error on an unknown method.
registry() {
  PYTHONPATH="$EVAL_ROOT${PYTHONPATH:+:$PYTHONPATH}" "${REGISTRY_PYTHON:-python3}" -m eval.registry "$@"
}

# Arguments every run of a method gets: the registry's explicit_args (e.g. the visual span start, 35 for
# LLaVA-1.5 vicuna_v1, where the official scripts passed 36 to some baselines: off by one).
method_fixed_args() {
  registry explicit-args "$1"
}

# The environment name of a method (envs/<Env>.txt, .venv-<Env>), from the registry.
method_env() {
  registry get "$1" env
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

# hf_hub_cache: the folder huggingface_hub downloads models into (its own lookup order).
hf_hub_cache() {
  echo "${HF_HUB_CACHE:-${HUGGINGFACE_HUB_CACHE:-${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}/hub}}"
}

# check_checkpoint CKPT [WHAT] [DEFAULT]: a local folder, or a hub id already downloaded into the Hugging Face
# cache (chunks on several GPUs must not each start a download, and GPU nodes are often offline).
check_checkpoint() {
  local ckpt=$1 what=${2:-a LLaVA-1.5 folder} default=${3:-liuhaotian/llava-v1.5-7b} cache
  [[ -e $ckpt ]] && return
  [[ $ckpt =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$ ]] \
    || die "checkpoint $ckpt does not exist; set CKPT to $what or a hub id (default $default:" \
           "huggingface-cli download $default)"
  cache=$(hf_hub_cache)
  compgen -G "$cache/models--${ckpt//\//--}/snapshots/*/config.json" >/dev/null \
    || die "checkpoint $ckpt is not downloaded (not in the Hugging Face cache $cache); download it first:" \
           "huggingface-cli download $ckpt, or set CKPT to $what"
}

# check_limit: LIMIT is empty or a positive integer.
check_limit() {
  [[ -z ${LIMIT:-} || $LIMIT =~ ^[1-9][0-9]*$ ]] \
    || die "LIMIT=$LIMIT is not a positive integer (the number of questions to run, for smoke tests); unset it for full runs"
}

# check_scorer_inputs PYTHON DATA_DIR BENCHMARK...: what each benchmark's scorer will read exists, and the first
# LIMIT questions can be scored, before any answer is produced (eval.run --check-only checks the questions
# and images). POPE-format benchmarks are scored per coco/coco_pope_<category>.json by LLaVA's eval_pope.py,
# which divides by zero for a category without answers; other scorers' files are the registry's extra_files.
check_scorer_inputs() {
  local py=$1 data=$2 msg
  shift 2
  msg=$("$py" - "$data" "${LIMIT:-0}" "$@" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
from eval.benchmarks import get_benchmark
data_dir, limit = Path(sys.argv[1]), int(sys.argv[2])
for key in sys.argv[3:]:
    bench = get_benchmark(key)
    root = bench.root(data_dir)
    for rel in bench.extra_files:
        if not (root / rel).exists():
            sys.exit(f"{bench.title}'s scorer needs {root / rel}, which does not exist; "
                     f"download LLaVA's eval data ({bench.data_hint}) into {root}")
    if key != "pope" and not key.startswith("synthetic_"):
        continue
    cats = sorted(f.name[len("coco_pope_"):-len(".json")] for f in (root / "coco").glob("coco_pope_*.json"))
    if not cats:
        sys.exit(f"{bench.title}'s scorer (LLaVA eval_pope.py) needs its label files {root / 'coco'}/coco_pope_"
                 f"<category>.json, which do not exist; download LLaVA's eval data ({bench.data_hint}) into {root}")
    if limit:
        first = {}
        with open(bench.questions_path(data_dir)) as f:
            for i, line in enumerate(f):
                if line.strip():
                    first.setdefault(json.loads(line).get("category"), i)
        missing = [c for c in cats if c not in first]
        if missing:
            sys.exit(f"{bench.title}: {root / 'coco'}/coco_pope_{missing[0]}.json has no question in "
                     f"{bench.questions_path(data_dir)}; the data is inconsistent (download it again)")
        need = max(first[c] for c in cats) + 1
        if limit < need:
            sys.exit(f"LIMIT={limit} is too small for {bench.title}: its scorer needs answers in every category "
                     f"({', '.join(cats)}), which the first {need} questions reach; use LIMIT={need} or more")
EOF
  ) || die "$(echo "$msg" | tail -n 1)"
}

check_data_dir() {
  [[ -d $1 ]] || die "dataset folder DATA_DIR=$1 does not exist; download LLaVA's eval data (third_party/LLaVA/docs/Evaluation.md: eval.zip and each benchmark's images) there, or set DATA_DIR"
}

_csv() { echo "$1" | tr ' ' ',' | sed 's/,,*/,/g; s/^,//; s/,$//'; }

# Sets EVAL_ARGS (the driver's arguments from the knobs, chunking excluded) after checking checkpoint and data.
eval_args() {
  local method=$1 ckpt data extra fixed_line
  ckpt=${CKPT:-liuhaotian/llava-v1.5-7b}
  data=${DATA_DIR:-$EVAL_ROOT/playground/data/eval}
  check_checkpoint "$ckpt"
  check_data_dir "$data"
  check_limit
  local -a fixed method_args
  fixed_line=$(method_fixed_args "$method") || exit 2
  read -ra fixed <<<"$fixed_line"
  # read -a splits on whitespace without pathname expansion (METHOD_ARGS='k=*' stays literal).
  read -ra method_args <<<"${METHOD_ARGS:-}"
  EVAL_ARGS=(--method "$method" --benchmark "$(_csv "${BENCHMARKS:-$PAPER_BENCHMARKS}")"
             --mode "$(_csv "${MODES:-off full}")" --model-path "$ckpt" --data-dir "$data"
             --answers-dir "${ANSWERS_DIR:-$EVAL_ROOT/outputs/answers}" "${fixed[@]}")
  for extra in "${method_args[@]}"; do EVAL_ARGS+=(--method-arg "$extra"); done
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
  local method=$1 env py gpus n k rc failed=0 dirs
  env=$(method_env "$method") || exit 2
  py=$(method_python "$env") || exit 2
  eval_args "$method"
  IFS=',' read -ra gpus <<<"${GPUS:-${CUDA_VISIBLE_DEVICES:-0}}"
  n=${#gpus[@]}
  cd "$EVAL_ROOT" || exit 2
  export PYTHONPATH="$EVAL_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  dirs=$("$py" -m eval.run "${EVAL_ARGS[@]}" --num-chunks "$n" --check-only) || exit 2
  local -a benches
  read -ra benches <<<"$(echo "${BENCHMARKS:-$PAPER_BENCHMARKS}" | tr ',' ' ')"
  check_scorer_inputs "$py" "${DATA_DIR:-$EVAL_ROOT/playground/data/eval}" "${benches[@]}"
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
