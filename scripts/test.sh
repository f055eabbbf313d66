#!/usr/bin/env bash
# Run the whole test suite offline on CPU: bash scripts/test.sh [pytest args]
# Installs requirements.txt into .venv on first use (and whenever it changes).
# Test files run in parallel, TEST_WORKERS at a time (default 2, one per core here; 0 runs them in this
# process): a file stays on one worker, so its module fixtures (trained models) are built once.
source "$(dirname "$0")/setup_env.sh" pytest==9.2.0 pytest-xdist==3.8.0
export SWANLAB_MODE=disabled
# One thread per worker: the workers already fill the cores, and small matrices gain nothing from more.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PARALLEL=(-n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder)  # files in conftest.py's order
# Test files or folders among the arguments: run just those; otherwise the whole suite.
for arg in "$@"; do
    case "$arg" in tests*) exec python -m pytest "${PARALLEL[@]}" "$@" ;; esac
done
python -m pytest "${PARALLEL[@]}" tests "$@"
