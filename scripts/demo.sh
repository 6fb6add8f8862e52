#!/usr/bin/env bash
# The embedded demo: the whole eval path on CPU, offline, in under 3 minutes (python -m eval.demo --help).
# A tiny random LLaVA-1.5 and three synthetic benchmarks are generated under OUT (default outputs/demo);
# the driver runs modes off and full for plain LLaVA and for every baseline whose third_party/<Name> is
# populated and whose environment (.venv-<Name> or envs/venv-<Name>) exists, each in its own interpreter on a
# temporary patched copy of its tree (third_party/ is never modified); LLaVA's eval_pope.py scores,
# eval.report draws the table and radar, and report/kept_tokens.png shows the visual tokens the baselines
# really kept under off vs full (with no baseline: a FastV-style stand-in on plain LLaVA). Baselines that
# cannot run are named with the reason.
#   bash scripts/demo.sh            PYTHON=... to pick the interpreter (default .venv-test/bin/python)
#                                   DEMO_PYTHON_<METHOD>=... a baseline's interpreter (e.g. DEMO_PYTHON_FASTV)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-$root/.venv-test/bin/python}
[[ -x $py ]] || { echo "error: no Python at $py; build the test environment with: bash setup.sh --test (or set PYTHON=...)" >&2; exit 2; }
missing=$("$py" - <<'PY'
import importlib.util
need = ["torch", "transformers", "sentencepiece", "llava", "accelerate", "matplotlib", "PIL", "tqdm"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PY
)
[[ -z $missing ]] || { echo "error: $py lacks: $missing (the demo needs accelerate for LLaVA's load_pretrained_model and matplotlib for the figures: pip install accelerate==0.21.0 matplotlib)" >&2; exit 2; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$py" -W ignore -m eval.demo --out "${OUT:-$root/outputs/demo}" "$@"
