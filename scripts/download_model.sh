#!/usr/bin/env bash
# Model weights from ModelScope, to the paths the configs read:
#   bash scripts/download_model.sh [LOCAL_DIR]            Qwen2.5-VL-3B-Instruct (configs/SFT_Qwen2_5-VL-3B-Instruct_vqa*.yaml)
#   bash scripts/download_model.sh qwen3_vl [LOCAL_DIR]   Qwen3-VL-4B-Instruct (configs/SFT_Qwen3-VL-4B-Instruct_vqa*.yaml)
#   bash scripts/download_model.sh qwen3_5 [LOCAL_DIR]    Qwen3.5-0.8B, the smallest Qwen3.5 with vision (configs/SFT_Qwen3.5-0.8B_vqa*.yaml)
# From the Hugging Face Hub instead: hf download Qwen/Qwen3-VL-4B-Instruct --local-dir ./models/Qwen3-VL-4B-Instruct
# (or hf download Qwen/Qwen3.5-0.8B --local-dir ./models/Qwen3.5-0.8B)
set -euo pipefail
if [ "${1:-}" = qwen3_5 ]; then
    modelscope download --model Qwen/Qwen3.5-0.8B --local_dir "${2:-./models/Qwen3.5-0.8B}"
elif [ "${1:-}" = qwen3_vl ]; then
    modelscope download --model Qwen/Qwen3-VL-4B-Instruct --local_dir "${2:-./models/Qwen3-VL-4B-Instruct}"
else
    modelscope download --model Qwen/Qwen2.5-VL-3B-Instruct --local_dir "${1:-./models/Qwen2.5-VL-3B-Instruct}"
fi
