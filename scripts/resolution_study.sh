#!/usr/bin/env bash
# What does the image side the model sees do to small targets? The tiny model trained through demo.sh at
# max_image_side 112, 224 and 336 (same data, steps and recipe otherwise), scored by target size on a
# validation split drawn with its own seed (never the demo's test images). Source images are 336 px
# square with one shape a tenth to 0.3 of the side: a tenth is 34 px, 11 px once resized to 112, under
# one 28 px image token, as a TextVQA text box is at the tutorial's 256 px.
#   bash scripts/resolution_study.sh                   # extra flags go to demo.sh, e.g. --max_steps 200
# Writes the table to outputs/resolution/table.md and the plot to outputs/resolution/acc_by_size.png.
set -euo pipefail
OUT=outputs/resolution
SIDES=(112 224 336)
for side in "${SIDES[@]}"; do
    bash "$(dirname "$0")/demo.sh" --workdir "$OUT/$side" --max_image_side "$side" --num_samples 1000 \
        --num_test 200 --max_steps 400 "$@" -- --seed 11 --min_side 336 --max_side 336 \
        --min_object 0.1 --max_object 0.3 --shapes square --colors red blue
done
set --  # setup_env.sh would read leftover arguments as packages to install
source "$(dirname "$0")/setup_env.sh"
python scripts/plot_resolution_study.py "$OUT" "${SIDES[@]}"
