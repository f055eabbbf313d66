# Sourced by scripts/test.sh and scripts/demo.sh: creates .venv inside the repo and installs
# requirements.txt (plus any extra packages passed as arguments) only when they changed since
# the last install. Afterwards `python` is the venv's.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${VENV_DIR:-$REPO_DIR/.venv}"
WANTED="$(cat "$REPO_DIR/requirements.txt"; echo "$*")"
# One stamp per set of wants: test.sh (which adds pytest) and demo.sh must not re-install for each other.
STAMP="$VENV_DIR/.installed-$(printf '%s' "$WANTED" | sha256sum | cut -c1-16)"

if [ ! -x "$VENV_DIR/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV_DIR"
    python3 -m venv "$VENV_DIR"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANTED" ]; then
    echo "[setup] installing requirements.txt $* (first run or requirements changed)"
    "$VENV_DIR/bin/pip" install --quiet --disable-pip-version-check -r "$REPO_DIR/requirements.txt" "$@"
    printf '%s' "$WANTED" > "$STAMP"
else
    echo "[setup] requirements unchanged since last install, skipping pip"
fi
export PATH="$VENV_DIR/bin:$PATH"
# Nothing in this repo downloads at test/demo time: the model and data are built locally.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
cd "$REPO_DIR"
