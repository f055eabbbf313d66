#!/usr/bin/env bash
# What does the image side the model sees do to small targets? The demo (demo.sh: its data, tiny model,
# config and steps) trained at max_image_side 112, 224 (the demo's) and 336, everything else equal, each
# scored by target side ("side < 15%" of the image's short side or not, scoring.SIDE_BUCKETS) on a
# validation split: the data is drawn with its own seed (11), so neither the training nor the scored images
# are the demo's test images. A target a tenth of the short side is 6-11 px at 112, under half a 28 px image
# token, as a TextVQA text box is at the tutorial's 256 px.
#   bash scripts/resolution_study.sh                   # extra flags go to demo.sh, e.g. --max_steps 200
# Writes the table to outputs/resolution/table.md and the plot to outputs/resolution/acc_by_size.png.
set -euo pipefail
OUT=outputs/resolution
SIDES=(112 224 336)
for side in "${SIDES[@]}"; do
    bash "$(dirname "$0")/demo.sh" --workdir "$OUT/$side" --max_image_side "$side" "$@" -- --seed 11
done
set --  # setup_env.sh would read leftover arguments as packages to install
source "$(dirname "$0")/setup_env.sh"
python scripts/plot_resolution_study.py "$OUT" "${SIDES[@]}"
