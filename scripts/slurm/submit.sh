#!/usr/bin/env bash
# Submit a whole evaluation to SLURM: an array of CHUNKS one-GPU tasks, then a merge-and-score job that runs
# when all succeeded. Checks everything first (environment, checkpoint, data) and exits 2 on the first problem.
#   METHOD=fastv ENV=FastV CHUNKS=16 CKPT=... DATA_DIR=... bash scripts/slurm/submit.sh
# A failed or preempted task can simply be resubmitted (answers resume per question).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
: "${METHOD:?set METHOD (fastv, pdrop, sparsevlm, himap, tokencarve, llava)}" "${ENV:?set ENV (FastV, PyramidDrop, ...)}"
CHUNKS=${CHUNKS:-8}
command -v sbatch >/dev/null || die "sbatch not found: this script submits to SLURM (use scripts/run_$METHOD.sh on one node)"
eval_args "$METHOD"
py=$(method_python "$ENV") || exit 2
cd "$EVAL_ROOT"
PYTHONPATH="$EVAL_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$py" -m eval.run "${EVAL_ARGS[@]}" --num-chunks "$CHUNKS" --check-only >/dev/null
mkdir -p outputs/slurm
array=$(sbatch --parsable --array="0-$((CHUNKS - 1))" --export="ALL,METHOD=$METHOD,ENV=$ENV" scripts/slurm/eval_array.sbatch)
final=$(sbatch --parsable --dependency="afterok:$array" --export="ALL,METHOD=$METHOD,ENV=$ENV,CHUNKS=$CHUNKS" \
        scripts/slurm/merge_score.sbatch)
echo "submitted eval array $array ($CHUNKS tasks) and merge/score job $final"
