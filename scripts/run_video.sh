#!/usr/bin/env bash
# Video QA with Video-LLaVA (MSVD-QA, MSRVTT-QA, TGIF-QA; ActivityNet-QA optional): FastV pruning at layer K
# of its LLM over the 8 x 257 video tokens, debias modes off and full, through Video-LLaVA's own (patched)
# run_inference_video_qa.py, which `python -m eval.video_qa infer` runs from the tree's root
# (third_party/Video-LLaVA: its LanguageBind towers land in ./cache_dir there), one chunk per GPU; then merge,
# the keyless score and, with OPENAI_API_KEY, the GPT-3.5 judge. Rerunning the same command resumes
# (eval/video_qa.py says how). Knobs (environment variables):
#   CKPT            checkpoint folder or hub id; its name must contain "llava"  default LanguageBind/Video-LLaVA-7B
#                   (a hub id must already be in the Hugging Face cache: huggingface-cli download <id>)
#   VIDEO_DATA_DIR  the GPT_Zero_Shot_QA folder (Video-LLaVA TRAIN_AND_VALIDATE.md)
#                                                     default ${DATA_DIR:-<repo>/playground/data/eval}/GPT_Zero_Shot_QA
#   BENCHMARKS      msvd msrvtt tgif activitynet      default "msvd msrvtt tgif"
#   MODES           debias modes                      default "off full" ("off" when FASTV_K=0); pad = off here
#   DEBIAS_TREND    needed by pos/full: calibrated:<file> covering 2056 positions (no video trend is published;
#                   python -m eval.video_qa --help, "Calibrating"). TREND is read as an alias.
#   FASTV_K, FASTV_RANK  pruning layer and kept tokens  default 2 and 1028 (half of 2056); FASTV_K=0: no pruning
#   GPUS            comma-separated GPU ids, one chunk per GPU   default $CUDA_VISIBLE_DEVICES or 0
#   ANSWERS_DIR     default <repo>/outputs/video      LIMIT: only the first N questions (smoke tests)
#   OPENAI_API_KEY  runs the judge (OPENAI_API_BASE optional); without it the answers and keyless score are kept
#   PYTHON          interpreter                       default the Video-LLaVA environment (envs/venv-Video-LLaVA)
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

py=$(method_python Video-LLaVA) || exit 2
tree=${EVAL_THIRD_PARTY:-$EVAL_ROOT/third_party}/Video-LLaVA
if [[ -z ${EVAL_THIRD_PARTY:-} ]]; then  # the submodule must hold exactly our series (an export is checked in plan)
  [[ -e $tree/.git ]] || die "$tree is not populated; run: git submodule update --init third_party/Video-LLaVA"
  state=$(bash "$EVAL_ROOT/scripts/apply_patches.sh" --status Video-LLaVA 2>&1)
  [[ $state == *" applied=yes"* ]] || die "third_party/Video-LLaVA does not have patches/Video-LLaVA applied" \
    "($(echo $state)); run: bash scripts/apply_patches.sh Video-LLaVA"
fi
check_checkpoint "${CKPT:-LanguageBind/Video-LLaVA-7B}" "a Video-LLaVA folder" LanguageBind/Video-LLaVA-7B
check_limit
K=${FASTV_K:-2}
[[ $K == 0 ]] && MODES=${MODES:-off}
args=(--answers-dir "${ANSWERS_DIR:-$EVAL_ROOT/outputs/video}" --model-path "${CKPT:-LanguageBind/Video-LLaVA-7B}"
      --data-dir "${VIDEO_DATA_DIR:-${DATA_DIR:-$EVAL_ROOT/playground/data/eval}/GPT_Zero_Shot_QA}"
      --benchmarks "${BENCHMARKS:-msvd msrvtt tgif}" --modes "${MODES:-off full}" --video-llava "$tree"
      --trend "${DEBIAS_TREND:-${TREND:-}}" --fastv-k "$K" --fastv-rank "${FASTV_RANK:-1028}")
[[ -n ${LIMIT:-} ]] && args+=(--limit "$LIMIT")
export PYTHONPATH="$EVAL_ROOT${PYTHONPATH:+:$PYTHONPATH}"
runs=$("$py" -m eval.video_qa plan "${args[@]}") || exit 2
mapfile -t runs <<<"$runs"
IFS=',' read -ra gpus <<<"${GPUS:-${CUDA_VISIBLE_DEVICES:-0}}"
n=${#gpus[@]}
failed=0
for run in "${runs[@]}"; do
  echo "== $run: $n chunk(s) on GPU(s) ${gpus[*]} ($py)"
  pids=()
  for k in $(seq 0 $((n - 1))); do  # chunk 0 on the terminal, the others to a log each
    if [[ $k -eq 0 ]]; then
      CUDA_VISIBLE_DEVICES=${gpus[k]} "$py" -m eval.video_qa infer --run-dir "$run" --num-chunks "$n" --chunk-idx 0 &
    else
      CUDA_VISIBLE_DEVICES=${gpus[k]} "$py" -m eval.video_qa infer --run-dir "$run" --num-chunks "$n" \
        --chunk-idx "$k" >"$run/chunk$k.log" 2>&1 &
    fi
    pids[k]=$!
  done
  ok=1
  for k in "${!pids[@]}"; do
    log="log $run/chunk$k.log"
    [[ $k -eq 0 ]] && log="output above"
    wait "${pids[k]}" || { echo "error: chunk $k of $run failed ($log); rerun to resume" >&2; ok=0; }
  done
  if [[ $ok -eq 0 ]] || ! "$py" -m eval.video_qa merge --run-dir "$run" \
       || ! "$py" -m eval.video_qa score --run-dir "$run"; then
    failed=1; continue
  fi
  if [[ -n ${OPENAI_API_KEY:-} ]]; then
    "$py" -m eval.video_qa judge --run-dir "$run" || failed=1
  else
    echo "note: OPENAI_API_KEY is not set, so the GPT-3.5 judge did not run; answers kept in $run/merge.jsonl," \
         "keyless score in $run/score_keyless.json; judge later: python -m eval.video_qa judge --run-dir $run"
  fi
done
"$py" -m eval.video_qa report --answers-dir "${ANSWERS_DIR:-$EVAL_ROOT/outputs/video}" >/dev/null || failed=1
echo "== table: ${ANSWERS_DIR:-$EVAL_ROOT/outputs/video}/video_results.md"
exit $failed
