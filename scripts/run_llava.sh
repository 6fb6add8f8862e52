#!/usr/bin/env bash
# Evaluate plain LLaVA-1.5 (no pruning, the reference) on the LLaVA benchmarks, debias modes off and full.
# Knobs (CKPT, DATA_DIR, BENCHMARKS, MODES, TREND, METHOD_ARGS, GPUS, ...): see scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# No pruning means no ranking site, so only "off" is meaningful (another mode needs TREND and changes nothing).
MODES=${MODES:-off}
run_method llava
