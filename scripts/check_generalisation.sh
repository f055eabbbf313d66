#!/usr/bin/env bash
# Does the demo's recipe generalise? The same configs/demo_tiny_cpu.yaml and tiny-model defaults, trained
# through scripts/demo.sh on synthetic data the recipe was never tuned on: other colours and shapes,
# objects from a tenth to half of the short side (TextVQA's text boxes are about a tenth), textured and
# cluttered backgrounds, image sides 160-640 px, 4000 training samples. Same time as the demo.
#   bash scripts/check_generalisation.sh            # extra flags go to demo.sh, e.g. --max_steps 500
#   bash scripts/check_generalisation.sh --data_seed 8 --workdir outputs/generalisation_8   # other images
set -euo pipefail
DATA_SEED=7
if [ "${1:-}" = --data_seed ]; then DATA_SEED="$2"; shift 2; fi
exec bash "$(dirname "$0")/demo.sh" --workdir outputs/generalisation --num_samples 4000 "$@" -- \
    --seed "$DATA_SEED" --colors purple orange cyan pink --shapes diamond cross bar --clutter --texture mixed \
    --min_object 0.1 --max_object 0.5 --min_side 160 --max_side 640
