########################################################
# GRPO after SFT (grpo.py) with 8 GPUs, DeepSpeed ZeRO-2, bf16:
#   bash scripts/grpo_vqa_8gpu-z2.sh configs/GRPO_Qwen2_5-VL-3B-Instruct_vqa.yaml
########################################################
accelerate launch \
    --num_processes 8 \
    --main_process_port 25002 \
    --config_file configs/deepspeed_bf16_zero2.yaml \
    grpo.py \
    --config "${1:-configs/GRPO_Qwen2_5-VL-3B-Instruct_vqa.yaml}"
