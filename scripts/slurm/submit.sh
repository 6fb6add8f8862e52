#!/usr/bin/env bash
# Submit a whole evaluation to SLURM: an array of CHUNKS one-GPU tasks, then a merge-and-score job that runs
# once every task has ended and merges only if every chunk is complete. Checks everything first
# (environment, checkpoint, data) and exits 2 on the first problem.
#   METHOD=<key> CHUNKS=16 CKPT=... DATA_DIR=... bash scripts/slurm/submit.sh
# (keys: python -m eval.registry methods; the environment is the registry's, ENV overrides it)
# Re-running failed or preempted tasks alone (answers resume per question): the same command with TASKS set to
# their indices, e.g. TASKS=5 or TASKS=3,7-9; CHUNKS must stay what the first submission used. A new
# merge-and-score job is queued after them (the first one will have stopped, naming the incomplete chunks).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
: "${METHOD:?set METHOD (a key of: python -m eval.registry methods)}"
ENV=${ENV:-$(method_env "$METHOD")} || exit 2
CHUNKS=${CHUNKS:-8}
[[ $CHUNKS =~ ^[1-9][0-9]*$ ]] || die "CHUNKS=$CHUNKS is not a positive integer (the number of array tasks)"
tasks=${TASKS:-0-$((CHUNKS - 1))}
[[ $tasks =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]] \
  || die "TASKS=$tasks is not a list of task indices (e.g. 5 or 3,7-9)"
for idx in $(echo "$tasks" | tr ',-' '  '); do
  ((10#$idx < CHUNKS)) || die "TASKS=$tasks names task $idx, outside 0..$((CHUNKS - 1)) for CHUNKS=$CHUNKS"
done
command -v sbatch >/dev/null || die "sbatch not found: this script submits to SLURM (use scripts/run_$METHOD.sh on one node)"
eval_args "$METHOD"
py=$(method_python "$ENV") || exit 2
cd "$EVAL_ROOT"
PYTHONPATH="$EVAL_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$py" -m eval.run "${EVAL_ARGS[@]}" --num-chunks "$CHUNKS" --check-only >/dev/null
mkdir -p outputs/slurm
# CHUNKS travels with every task: the chunk count is the evaluation's, not the size of this array.
array=$(sbatch --parsable --array="$tasks" --export="ALL,METHOD=$METHOD,ENV=$ENV,CHUNKS=$CHUNKS" \
        scripts/slurm/eval_array.sbatch)
# afterany: the merge runs even when a task failed, and then names what to resubmit.
final=$(sbatch --parsable --dependency="afterany:$array" --export="ALL,METHOD=$METHOD,ENV=$ENV,CHUNKS=$CHUNKS" \
        scripts/slurm/merge_score.sbatch)
echo "submitted eval array $array (tasks $tasks of $CHUNKS) and merge/score job $final"
