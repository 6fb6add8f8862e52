#!/usr/bin/env bash
# The study on the real-weights study model (docs/study.md): every baseline x mode x budget, controls, figures.
#   bash scripts/study.sh --quick                      a CPU slice (16 questions, budget 64, off vs full)
#   bash scripts/study.sh --device cuda --parallel 14  the full study on a GPU (under CUDA MPS: docs/study.md)
# Options are python -m study run's (--help). Baselines without an environment or upstream are left out and
# listed in the report. Outputs: outputs/study/{study.json,report.md,*.png,figures/} (--quick: outputs/study-quick/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-.venv-test/bin/python}
[[ -x $py ]] || { echo "error: no Python at $py; build the test environment: bash setup.sh --test" >&2; exit 2; }
"$py" -m study assemble --refresh >/dev/null   # reuses the folder when it holds the committed weights
exec "$py" -m study run --skip-unavailable "$@"
