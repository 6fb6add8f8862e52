#!/usr/bin/env bash
# Evaluate TokenCarve on the LLaVA benchmarks, debias modes off and full.
# Knobs (CKPT, DATA_DIR, BENCHMARKS, MODES, TREND, METHOD_ARGS, GPUS, ...): see scripts/lib/common.sh.
# The sys length passed is 35 (the visual span start for vicuna_v1; python -m eval.registry explicit-args tokencarve):
# the official repo passed 36, off by one.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
run_method tokencarve
