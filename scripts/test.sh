#!/usr/bin/env bash
# Run the whole test suite offline on CPU: bash scripts/test.sh [pytest args]
# Installs requirements.txt into .venv on first use (and whenever it changes).
source "$(dirname "$0")/setup_env.sh" pytest==9.2.0
export SWANLAB_MODE=disabled
python -m pytest tests "$@"
