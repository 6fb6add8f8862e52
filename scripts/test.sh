#!/usr/bin/env bash
# The project's test command (README "Test"): the main suite in .venv-test, then each baseline's
# tests in its own CPU environment (.venv-<Name>, built by `bash setup.sh --test-env <Name>`).
# Baseline tests that lack a populated third_party/<Name> or their environment skip with a reason.
#   usage: bash scripts/test.sh [pytest args for the main suite]
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${TEST_PYTHON:-$root/.venv-test/bin/python}
if [[ ! -x $py ]]; then
  echo "error: no test environment at $py; build it with: bash setup.sh --test" >&2
  exit 2
fi

# Baseline name -> test prefix, from the method registry; its tests are tests/baselines/test_<prefix>.py and
# test_<prefix>_*.py.
declare -A key=()
listing=$("$py" -m eval.registry tests) || { echo "error: cannot read the method registry (python -m eval.registry tests)" >&2; exit 2; }
while read -r name prefix; do
  [[ -n $name ]] && key[$name]=$prefix
done <<< "$listing"

ignore=()
declare -A files=()
for name in "${!key[@]}"; do
  [[ -x .venv-$name/bin/python ]] || continue
  found=()
  for file in tests/baselines/test_"${key[$name]}".py tests/baselines/test_"${key[$name]}"_*.py; do
    [[ -f $file ]] && found+=("$file") && ignore+=(--ignore="$file")  # run below, in its own environment
  done
  [[ ${#found[@]} -gt 0 ]] && files[$name]="${found[*]}"
done

status=0
run_pytest() {  # pytest exit 5 = nothing collected: not a failure here
  "$@"; local rc=$?
  [[ $rc -eq 5 ]] && rc=0
  [[ $rc -ne 0 ]] && status=$rc
  return 0
}

echo "== main suite ($("$py" -c 'import sys; print(sys.prefix)'))"
run_pytest "$py" -m pytest -q -rs "${ignore[@]}" "$@"
for name in "${!files[@]}"; do
  echo "== $name tests in .venv-$name"
  # shellcheck disable=SC2086  # the list holds plain paths
  run_pytest ".venv-$name/bin/python" -m pytest -q -rs ${files[$name]}
done
exit $status
