#!/usr/bin/env bash
# Qwen2.5-VL-3B-Instruct from ModelScope, to the path configs/SFT_Qwen2_5-VL-3B-Instruct_vqa*.yaml read.
#   bash scripts/download_model.sh [LOCAL_DIR]
set -euo pipefail
modelscope download --model Qwen/Qwen2.5-VL-3B-Instruct --local_dir "${1:-./models/Qwen2.5-VL-3B-Instruct}"
