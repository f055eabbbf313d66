#!/usr/bin/env bash
# Train sft.py on this machine's GPUs with DeepSpeed ZeRO-3 in bf16 (parameters sharded too, for models ZeRO-2 cannot fit).
#
#   bash scripts/sft_vqa_8gpu-z3.sh CONFIG.yaml [--any_key value ...]   # e.g. --max_steps 100
#
# GPUS_PER_NODE (default 8), MASTER_PORT (default 25001) and MIXED_PRECISION may be set in the environment.
# One machine is the one-node case of scripts/sft_multinode.sh, which does the launching.
set -euo pipefail
: "${1:?usage: bash scripts/sft_vqa_8gpu-z3.sh CONFIG.yaml [--any_key value ...]}"
export DEEPSPEED_CONFIG=configs/deepspeed_bf16_zero3.yaml NUM_NODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
exec bash "$(dirname "$0")/sft_multinode.sh" "$@"
