#!/usr/bin/env bash
# GPU latency benchmark: each patched method with DEBIAS=off vs full, beside unpruned LLaVA-1.5-7B
# (random fp16 weights; latency does not depend on their values). Each method runs in its own
# environment (envs/venv-<Name>, made by setup.sh). Writes outputs/bench/bench.{json,md}.
#   METHODS=<key>,<key> REPS=30 bash scripts/bench.sh   (default: every registry method marked bench:
#                                                        python -m eval.registry methods --driver any --supports bench)
# On a machine without network, carry the environments instead (see bench/carry.py):
#   python -m bench.carry prepare .carry/bench     # here
#   python -m bench.latency --carry .carry/bench   # there
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
  || { echo "error: no CUDA GPU visible to $py; the latency benchmark needs one" >&2; exit 2; }
exec "$py" -m bench.latency ${METHODS:+--methods "$METHODS"} --reps "${REPS:-20}" --out "${OUT:-outputs/bench}" "$@"
