#!/usr/bin/env bash
# GRPO after SFT (grpo.py) on this machine's GPUs with DeepSpeed ZeRO-2 in bf16.
#
#   bash scripts/grpo_vqa_8gpu-z2.sh [CONFIG.yaml] [--any_key value ...]   # default configs/GRPO_Qwen2_5-VL-3B-Instruct_vqa.yaml
#
# GPUS_PER_NODE (default 8), MASTER_PORT (default 25001) and MIXED_PRECISION may be set in the environment.
# The launching is scripts/sft_multinode.sh's (one node), with grpo.py as the entry point.
set -euo pipefail
export DEEPSPEED_CONFIG=configs/deepspeed_bf16_zero2.yaml NUM_NODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1
export GPUS_PER_NODE=${GPUS_PER_NODE:-8} TRAIN_SCRIPT=grpo.py
exec bash "$(dirname "$0")/sft_multinode.sh" "${@:-configs/GRPO_Qwen2_5-VL-3B-Instruct_vqa.yaml}"
