#!/usr/bin/env bash
# The study on a GPU machine with no network, over the bundle of `python -m study.carry prepare .carry/study`
# carried in the three calls that study.carry.CALLS lists (docs/study.md "On a GPU machine"). Runs from the repository root there.
#   bash scripts/study_gpu.sh install            wheels into /tmp/study-site, GGUF reassembled (once both halves are there)
#   bash scripts/study_gpu.sh train [MINUTES]    train (default 5 min, 1.5 of them vision warm-up; INIT=weights to
#                                                start from (then no warm-up), VISION_MINUTES, TURNS=3, TRAIN_OUT=folder,
#                                                default outputs/train: a new run needs a new one), assemble
#   bash scripts/study_gpu.sh cuda-tests [SECS]  debias_core's tests on the GPU (their CUDA paths)
#   bash scripts/study_gpu.sh run [ARGS...]      python -m study run on the GPU, results -> $OUT/study-results.tar.gz
#   bash scripts/study_gpu.sh start "ARGS" ...   study runs (one `python -m study run` per quoted ARGS, in turn) in their
#                                                own process session: they outlive this call while the machine stays held
#   bash scripts/study_gpu.sh wait SECS          wait up to SECS for them; pack what finished into $OUT either way
# `start` and `run` run the drivers under CUDA MPS where the machine has it (MPS=0: not): batch-1 drivers launch small
# kernels, which MPS runs side by side instead of giving each process the whole GPU in turn.
# A study continued from an earlier session: carry its finished runs as $CARRY/prior/runs.tar.gz (docs/study.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
carry=${CARRY:-.carry/study}
site=/tmp/study-site
out=${OUT:-outputs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 STUDY_ASSETS=$PWD/$carry/assets \
       SMOLLM2_GGUF=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py() { PYTHONPATH=$site/437:$site/common:$PWD python3 "$@"; }
model=$PWD/outputs/llava-smollm2-study   # outputs/ is ignored: it stays on a warm machine between calls
chain=outputs/study-chain                # the detached runs' logs and exit status

pack() {   # what finished (done.json, trends, logs of failed runs) -> $OUT; records and answers stay there
  tar -czf "$out/study-results.tar.gz" --exclude='answers' --exclude='record.npz' \
    --exclude='record.samples.json' -C outputs/study trends runs || true
  tar -czf "$out/study-calibration.tar.gz" --exclude='answers' --exclude='*.log' -C outputs/study runs/calibration || true
  [ -d "$chain" ] && cp -r "$chain" "$out"/ || true
  ls -la "$out"
}

mps_on() {   # CUDA MPS control daemon (default pipe directory, so every driver's CUDA context goes through it)
  [ "${MPS:-1}" = 1 ] || { echo "MPS: off (MPS=0)"; return 0; }
  command -v nvidia-cuda-mps-control > /dev/null || { echo "MPS: no nvidia-cuda-mps-control; time-shared"; return 0; }
  nvidia-cuda-mps-control -d 2> /dev/null || true   # fails harmlessly when already running
  if timeout 60 python3 -c "import torch; assert torch.ones(2, device='cuda').sum().item() == 2" 2>&1; then
    echo "MPS: on"
  else
    echo quit | nvidia-cuda-mps-control || true
    echo "MPS: a CUDA client failed under MPS; stopped it, time-shared"
  fi
}

prepare_run() {
  python3 -m study.carry install "$carry"
  [ -f "$model/study.json" ] || py -m study assemble --out "$model" --force
  if [ -f "$carry/prior/runs.tar.gz" ] && [ ! -d outputs/study/runs ]; then
    mkdir -p outputs/study && tar -xzf "$carry/prior/runs.tar.gz" -C outputs/study
    echo "prior: $(find outputs/study/runs -name done.json | wc -l) finished runs from $carry/prior/runs.tar.gz"
  fi
  mps_on | tee outputs/mps-status.txt
}

study_run() {
  PYTHONPATH=$site/437:$site/common:$PWD EVAL_THIRD_PARTY=$PWD/$carry/trees \
    python3 -m study run --carry "$carry" --device cuda --model "$model" --skip-unavailable "$@"
}

case ${1:-} in
  install)
    python3 -m study.carry install "$carry" ;;
  train)
    python3 -m study.carry install "$carry"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    dest=${TRAIN_OUT:-outputs/train}
    set +e
    # from scratch: 1.5 min of vision warm-up inside the budget; continuing from trained weights (INIT): none
    vision=${VISION_MINUTES:-$([ -n "${INIT:-}" ] && echo 0 || echo 1.5)}
    py -m study train --out "$dest" --device cuda --workers 14 --minutes "${2:-5}" --vision-minutes "$vision" \
      --batch 64 --turns "${TURNS:-3}" ${INIT:+--init "$INIT"} --val-every 250 --save-every 100000 2>&1 \
      | tee "$out/train.log" | grep -v '^train:\|^vision warm-up:'
    rc=${PIPESTATUS[0]}
    set -e
    # a refused or failed run must not pass off an earlier run's weights in $dest as this one's
    [ "$rc" = 0 ] || { echo "error: training exited $rc (log: train.log); nothing copied or assembled" >&2; exit "$rc"; }
    cp "$dest"/trained.safetensors "$dest"/train.json "$out"/
    py -m study assemble --trained "$dest"/trained.safetensors --out "$model" --force ;;
  cuda-tests)
    # the CUDA paths of debias_core's property tests (they skip without a GPU elsewhere)
    timeout "${2:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_core_*.py 2>&1 | tail -15 \
      | tee "$out/cuda-tests.txt" ;;
  run)
    shift
    prepare_run
    set +e
    STUDY_TIMEOUT=${STUDY_TIMEOUT:-540}
    export -f study_run; export carry model site
    timeout "$STUDY_TIMEOUT" bash -c 'study_run "$@"' _ "$@" 2>&1 | grep -v 'study runs:' | tail -40
    rc=${PIPESTATUS[0]}
    set -e
    pack
    exit "$rc" ;;
  start)
    shift
    prepare_run
    mkdir -p "$chain"
    cat outputs/mps-status.txt >> "$chain/progress.txt"
    export -f study_run; export carry model site chain
    # setsid: a process session of its own outlives the call (while the next call comes within 30 s)
    setsid nohup bash -c 'nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 10 > "$chain/gpu-util.csv" &
      i=0; for args in "$@"; do i=$((i + 1)); echo "$(date +%T) start $i: $args" >> "$chain/progress.txt"
        eval "study_run $args" > "$chain/run$i.log" 2>&1; rc=$?; echo "$(date +%T) exit $i: $rc" >> "$chain/progress.txt"
        uptime >> "$chain/progress.txt"; done; touch "$chain/finished"' _ "$@" > /dev/null 2>&1 < /dev/null &
    echo "started ${#@} study invocation(s); bash scripts/study_gpu.sh wait SECS collects" ;;
  wait)
    end=$((SECONDS + ${2:-500}))
    while [ ! -e "$chain/finished" ] && [ "$SECONDS" -lt "$end" ]; do sleep 10; done
    cat "$chain/progress.txt" 2>/dev/null || true
    echo "finished runs: $(find outputs/study/runs -name done.json 2>/dev/null | wc -l)"
    pack ;;
  *)
    sed -n 2,14p "$0"; exit 2 ;;
esac
