#!/usr/bin/env bash
# Run the whole test suite offline on CPU: bash scripts/test.sh [pytest args]
# Installs requirements.txt into .venv on first use (and whenever it changes).
source "$(dirname "$0")/setup_env.sh" pytest==9.2.0
export SWANLAB_MODE=disabled
# Test files or folders among the arguments: run just those; otherwise the whole suite.
for arg in "$@"; do
    case "$arg" in tests*) exec python -m pytest "$@" ;; esac
done
python -m pytest tests "$@"
