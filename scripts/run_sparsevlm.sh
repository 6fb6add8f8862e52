#!/usr/bin/env bash
# Evaluate SparseVLMs on the LLaVA benchmarks, debias modes off and full.
# Knobs (CKPT, DATA_DIR, BENCHMARKS, MODES, TREND, METHOD_ARGS, GPUS, ...): see scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
run_method sparsevlm
