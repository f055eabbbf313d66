# Qwen2.5-VL from ModelScope, to the path configs/SFT_Qwen2_5-VL-3B-Instruct_vqa.yaml reads
# usage: bash scripts/download_model.sh [LOCAL_DIR]
modelscope download --model Qwen/Qwen2.5-VL-3B-Instruct  --local_dir "${1:-./models/Qwen2.5-VL-3B-Instruct}"

# Qwen2-VL
# modelscope download --model Qwen/Qwen2-VL-2B-Instruct  --local_dir ./models/Qwen2-VL-2B-Instruct
