#!/usr/bin/env bash
# The study on a GPU machine with no network, over the bundle of `python -m study.carry prepare .carry/study`
# carried in the three calls that study.carry.CALLS lists (docs/study.md "On a GPU machine"). Runs from the repository root there.
#   bash scripts/study_gpu.sh install            wheels into /tmp/study-site, GGUF reassembled (once both halves are there)
#   bash scripts/study_gpu.sh train [MINUTES]    train (default 8 min; INIT=weights to start from, TURNS=3), assemble
#   bash scripts/study_gpu.sh cuda-tests [SECS]  debias_core's tests on the GPU (their CUDA paths)
#   bash scripts/study_gpu.sh run [ARGS...]      python -m study run on the GPU, results -> $OUT/study-results.tar.gz
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

case ${1:-} in
  install)
    python3 -m study.carry install "$carry" ;;
  train)
    python3 -m study.carry install "$carry"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    py -m study train --out outputs/train --device cuda --workers 14 --minutes "${2:-8}" --batch 64 \
      --turns "${TURNS:-3}" ${INIT:+--init "$INIT"} --val-every 250 --save-every 100000 2>&1 \
      | tee "$out/train.log" | grep -v '^train:' || true
    cp outputs/train/trained.safetensors outputs/train/train.json "$out"/
    py -m study assemble --trained outputs/train/trained.safetensors --out "$model" --force ;;
  cuda-tests)
    # the CUDA paths of debias_core's property tests (they skip without a GPU elsewhere)
    timeout "${2:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_core_*.py 2>&1 | tail -15 \
      | tee "$out/cuda-tests.txt" ;;
  run)
    shift
    python3 -m study.carry install "$carry"
    set +e
    PYTHONPATH=$site/437:$site/common:$PWD EVAL_THIRD_PARTY=$PWD/$carry/trees timeout "${STUDY_TIMEOUT:-540}" \
      python3 -m study run --carry "$carry" --device cuda --model "$model" --skip-unavailable "$@" \
      2>&1 | grep -v 'study runs:' | tail -40
    rc=${PIPESTATUS[0]}
    set -e
    tar -czf "$out/study-results.tar.gz" --exclude='answers' --exclude='record.npz' \
      --exclude='record.samples.json' -C outputs/study trends runs || true
    tar -czf "$out/study-calibration.tar.gz" --exclude='answers' --exclude='*.log' -C outputs/study runs/calibration || true
    ls -la "$out"
    exit "$rc" ;;
  *)
    sed -n 2,7p "$0"; exit 2 ;;
esac
