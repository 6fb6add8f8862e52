#!/usr/bin/env bash
# Evaluate iLLaVA, debias modes off and full. Two targets:
#
# TARGET=llava15 (default): the LLaVA-1.5 port (patches/LLaVA: iLLaVA's LLM-stage merging, k=2, r=448) through
#   the common eval driver on the ten image benchmarks, like the other run scripts. Knobs (CKPT, DATA_DIR,
#   BENCHMARKS, MODES, TREND, METHOD_ARGS e.g. "illava_llm_r=384", GPUS, ...): see scripts/lib/common.sh. The
#   default trend is paper:fastv (at k=2 the port ranks by FastV's score). Needs third_party/LLaVA with
#   patches/LLaVA applied (the llava-torch wheel has no port).
#
# TARGET=onevision: native iLLaVA on LLaVA-OneVision (patches/iLLaVA) through iLLaVA's own lmms-eval entry, with
#   iLLaVA's README command, in the iLLaVA environment (envs/iLLaVA.txt), one lmms-eval process per GPU
#   (accelerate launch). The patched third_party/iLLaVA sources come first on PYTHONPATH. Knobs:
#   CKPT           default lmms-lab/llava-onevision-qwen2-7b-ov (a hub id must already be in the Hugging Face
#                  cache: huggingface-cli download lmms-lab/llava-onevision-qwen2-7b-ov)
#   BENCHMARKS     lmms-eval task names; the paper's names map to tasks (mmbench -> mmbench_en_dev, textvqa ->
#                  textvqa_val, ...). Default: the ten image benchmarks. Data: lmms-eval reads each task's
#                  dataset from the Hugging Face hub cache (HF_HOME); download it there first on offline machines.
#   MODES          default "off": the only mode that needs no trend (natively pad = off and full = pos:
#                  OneVision pads no image). "off full" or "off pos" once you have a calibrated trend:
#   DEBIAS_TREND   needed by pos/full: calibrated:<file> whose "n" covers the LLM context (max_position_embeddings,
#                  32768 for Qwen2-7B); no OneVision trend is published. TREND is read as an alias. To calibrate:
#                  run MODES=off on a held-out calibration task with the LLM-stage scores recorded
#                  (debias_core.recording(), see docs/analysis.md), fit them with
#                  python -m debias_core fit --scores S.npy --out ov_trend.json, check that its "n" is at least
#                  max_position_embeddings, then MODES="off full" DEBIAS_TREND=calibrated:ov_trend.json.
#   ILLAVA_PRESET  image (default; ViT k 5-6-7-8 r 92, LLM k 8 r 0.70) | video (32 frames, ViT 3-4-5-6, LLM k 2)
#   ILLAVA_ARGS    replaces the preset's iLLaVA model_args (e.g. "enable_illava_llm=True,illava_llm_k=8,...")
#   GPUS, ANSWERS_DIR (results under <ANSWERS_DIR>/onevision/...), LIMIT (lmms-eval --limit), PYTHON
#   Resume: lmms-eval 0.2.4 cannot resume inside a task (its --use_cache is parsed but never used), so a task and
#   mode whose results file exists is skipped and an interrupted one restarts from its beginning.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# require_series <Name> <file:marker>...: the patched tree, checked before any GPU work.
require_series() {
  local name=$1 tree=${EVAL_THIRD_PARTY:-$EVAL_ROOT/third_party}/$1 state fm; shift
  if [[ -z ${EVAL_THIRD_PARTY:-} ]]; then
    [[ -e $tree/.git ]] || die "$tree is not populated; run: git submodule update --init third_party/$name"
    state=$(bash "$EVAL_ROOT/scripts/apply_patches.sh" --status "$name" 2>&1)
    [[ $state == *" applied=yes"* ]] || die "third_party/$name does not have patches/$name applied" \
      "($(echo $state)); run: bash scripts/apply_patches.sh $name"
  fi
  for fm in "$@"; do
    grep -qF -- "${fm#*:}" "$tree/${fm%%:*}" 2>/dev/null \
      || die "$tree/${fm%%:*} lacks our patch series (patches/$name); run: bash scripts/apply_patches.sh $name"
  done
}

if [[ ${TARGET:-llava15} == llava15 ]]; then
  method_python "$(method_env illava)" >/dev/null || exit 2
  require_series LLaVA llava/model/language_model/illava_llama.py:debias_core
  run_method illava
  exit $?
fi
[[ $TARGET == onevision ]] || die "TARGET=$TARGET is unknown; use llava15 (default) or onevision"

set -o pipefail  # lmms-eval's exit status through tee
py=$(method_python iLLaVA) || exit 2
tree=${EVAL_THIRD_PARTY:-$EVAL_ROOT/third_party}/iLLaVA
ckpt=${CKPT:-lmms-lab/llava-onevision-qwen2-7b-ov}
check_checkpoint "$ckpt" "a LLaVA-OneVision folder" lmms-lab/llava-onevision-qwen2-7b-ov
check_limit
case ${ILLAVA_PRESET:-image} in  # iLLaVA README's commands for single/multi-image and for video benchmarks
  image) illava=enable_illava_vit=True,illava_vit_k=5-6-7-8,illava_vit_r=92
         illava+=,enable_illava_llm=True,illava_llm_k=8,illava_llm_r=0.70 ;;
  video) illava=max_frames_num=32,enable_illava_vit=True,illava_vit_k=3-4-5-6,illava_vit_r=92
         illava+=,enable_illava_llm=True,illava_llm_k=2,illava_llm_r=0.70 ;;
  *) die "ILLAVA_PRESET=$ILLAVA_PRESET is unknown; use image or video" ;;
esac
label=illava-${ILLAVA_PRESET:-image}
if [[ -n ${ILLAVA_ARGS:-} ]]; then  # own folder per setting, so that a finished task of another is never reused
  illava=$ILLAVA_ARGS
  label=illava-args$(printf %s "$illava" | md5sum | cut -c1-8)
fi
[[ -n ${LIMIT:-} ]] && label=$label-limit$LIMIT
model_args=pretrained=$ckpt,conv_template=qwen_1_5,model_name=llava_qwen_training_free,device_map=auto,$illava

trend=${DEBIAS_TREND:-${TREND:-}}
# The patch's debias_core context spans the whole LLM context, so a trend must cover max_position_embeddings.
need=32768
if [[ -f $ckpt/config.json ]]; then
  need=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("max_position_embeddings", 32768))' \
         "$ckpt/config.json") || die "$ckpt/config.json is not a readable JSON config"
fi
read -ra modes <<<"$(echo "${MODES:-off}" | tr ',' ' ')"
for mode in "${modes[@]}"; do
  case $mode in
    off|pad) ;;
    pos|full)
      [[ -n $trend ]] || die "mode $mode needs DEBIAS_TREND: no positional trend is published for LLaVA-OneVision" \
        "(Qwen2); calibrate one (record the LLM-stage scores with debias_core.recording() under DEBIAS=off, then" \
        "python -m debias_core fit) with n >= max_position_embeddings and pass DEBIAS_TREND=calibrated:<file>"
      msg=$(PYTHONPATH="$EVAL_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$py" - "$trend" "$need" 2>&1 <<'EOF'
import sys
from debias_core.presets import resolve_trend
try:
    n = resolve_trend(sys.argv[1]).for_stage(0).n
except Exception as e:
    sys.exit(f"cannot be loaded: {e}")
if n < int(sys.argv[2]):
    sys.exit(f"covers {n} positions but the visual span may reach {sys.argv[2]} (max_position_embeddings)")
EOF
      ) || die "DEBIAS_TREND=$trend $(echo "$msg" | tail -n 1); fit an OneVision trend with n >= $need" ;;
    *) die "debias mode '$mode' is unknown; use off, pad, pos or full" ;;
  esac
done

# The paper's benchmark names -> lmms-eval 0.2.4 tasks; other names are taken as lmms-eval tasks.
declare -A task_of=([gqa]=gqa [mmbench]=mmbench_en_dev [mmbench_cn]=mmbench_cn_dev [mme]=mme [mmvet]=mmvet
                    [pope]=pope [scienceqa]=scienceqa_img [textvqa]=textvqa_val [vizwiz]=vizwiz_vqa_val
                    [vqav2]=vqav2_val [seed]=seedbench)
tasks_dir=$tree/src/lmms_eval-0.2.4/lmms_eval/tasks
[[ -d $tasks_dir ]] || die "$tasks_dir does not exist; run: git submodule update --init third_party/iLLaVA"
tasks=()
for b in $(echo "${BENCHMARKS:-$PAPER_BENCHMARKS}" | tr ',' ' '); do
  t=${task_of[$b]:-$b}
  grep -rqsE "^(task|group): *\"?$t\"? *$" "$tasks_dir" --include='*.yaml' \
    || die "lmms-eval task '$t' (BENCHMARKS entry '$b') is not defined under $tasks_dir"
  tasks+=("$t")
done
require_series iLLaVA \
  src/transformers-4.46.0/src/transformers/models/qwen2/modeling_qwen2.py:debias_core \
  src/lmms_eval-0.2.4/lmms_eval/models/llava_onevision_training_free.py:debias_core
src=$tree/src
export PYTHONPATH="$src/lmms_eval-0.2.4:$src/transformers-4.46.0/src:$src/LLaVA-OneVision${PYTHONPATH:+:$PYTHONPATH}"
where=$("$py" - "$tree" 2>&1 <<'EOF'
import importlib.util, os, sys
tree = os.path.realpath(sys.argv[1])
for mod in ("lmms_eval", "transformers", "llava", "accelerate", "debias_core"):
    spec = importlib.util.find_spec(mod)
    if spec is None:
        sys.exit(f"the iLLaVA environment ({sys.executable}) has no {mod}")
    origin = os.path.realpath(spec.origin or "")
    if mod in ("lmms_eval", "transformers", "llava") and not origin.startswith(tree + os.sep):
        sys.exit(f"{mod} is imported from {spec.origin}, not from the patched tree {tree}")
EOF
) || die "$(echo "$where" | tail -n 1); build it with: bash setup.sh --only iLLaVA (envs/iLLaVA.txt)"

IFS=',' read -ra gpus <<<"${GPUS:-${CUDA_VISIBLE_DEVICES:-0}}"
n=${#gpus[@]}
launch=("$py" -m lmms_eval)
[[ $n -gt 1 ]] && launch=("$py" -m accelerate.commands.launch --num_processes "$n"
                          --main_process_port "${MAIN_PORT:-29517}" -m lmms_eval)
extra=()
[[ -n ${LIMIT:-} ]] && extra=(--limit "$LIMIT")
out_root=${ANSWERS_DIR:-$EVAL_ROOT/outputs/answers}/onevision/$(basename "$ckpt")
failed=0
for t in "${tasks[@]}"; do
  for mode in "${modes[@]}"; do
    tag=$mode env_trend=()
    if [[ $mode == pos || $mode == full ]]; then
      tag=$mode-$(basename "${trend#calibrated:}") env_trend=(DEBIAS_TREND="$trend")
    fi
    out=$out_root/$t/$label/$tag
    # What the folder holds; a finished task is reused only for the same settings.
    id="model_args=$model_args trend=${env_trend[*]} limit=${LIMIT:-}"
    if [[ -f $out/run.txt && $(cat "$out/run.txt") != "$id" ]]; then
      echo "error: $out holds results of another run ($(cat "$out/run.txt")); use another ANSWERS_DIR" >&2
      failed=1; continue
    fi
    if compgen -G "$out/*/*_results.json" >/dev/null; then
      echo "== $t $mode: done ($(compgen -G "$out/*/*_results.json" | head -n 1))"; continue
    fi
    mkdir -p "$out" && echo "$id" >"$out/run.txt"
    echo "== $t $mode on GPU(s) ${gpus[*]}: $out (log $out/lmms_eval.log)"
    if ! env -u DEBIAS_TREND -u DEBIAS_METHOD DEBIAS="$mode" "${env_trend[@]}" \
         CUDA_VISIBLE_DEVICES="${GPUS:-${CUDA_VISIBLE_DEVICES:-0}}" "${launch[@]}" \
         --model llava_onevision_training_free --model_args "$model_args" --tasks "$t" --batch_size 1 \
         --log_samples --log_samples_suffix llava_onevision_7b --output_path "$out" "${extra[@]}" \
         2>&1 | tee -a "$out/lmms_eval.log"; then
      echo "error: lmms-eval failed on $t ($mode); log $out/lmms_eval.log; rerun to retry" >&2
      failed=1
    fi
  done
done
exit $failed
