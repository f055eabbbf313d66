#!/usr/bin/env bash
# Train on several nodes with accelerate + DeepSpeed: run this once on every node, same arguments.
#
#   bash scripts/sft_multinode.sh CONFIG.yaml [--any_key value ...]
#
# Set on each node (all the same except NODE_RANK):
#   NUM_NODES         number of nodes
#   NODE_RANK         0 on the master node, then 1 .. NUM_NODES-1
#   MASTER_ADDR       address of node 0, reachable from every node
#   MASTER_PORT       a free TCP port on node 0 (default 25001)
#   GPUS_PER_NODE     processes per node (default: the GPUs nvidia-smi lists)
#   DEEPSPEED_CONFIG  accelerate config (default configs/deepspeed_bf16_zero2.yaml; or ..._zero3.yaml)
#   MIXED_PRECISION   overrides the accelerate config's mixed_precision (e.g. no, fp16)
#   TRAIN_SCRIPT      the entry point to launch (default sft.py; grpo.py for GRPO)
#
# Two nodes by hand:
#   node0$ NUM_NODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/sft_multinode.sh configs/SFT_Qwen2_5-VL-3B-Instruct_vqa.yaml
#   node1$ NUM_NODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash scripts/sft_multinode.sh configs/SFT_Qwen2_5-VL-3B-Instruct_vqa.yaml
#
# Under Slurm (one task per node; Slurm provides the node count, rank and host list):
#   #SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8
#   export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
#   srun bash -c 'NUM_NODES=$SLURM_NNODES NODE_RANK=$SLURM_NODEID bash scripts/sft_multinode.sh configs/SFT_Qwen2_5-VL-3B-Instruct_vqa.yaml'
#
# Preemption and time limits: SIGTERM makes every rank save a checkpoint at the same step and stop, but the
# launcher then exits 1, like a crash. The run also leaves OUTPUT_DIR/PREEMPTED ("step N of M: checkpoint
# dir"), removed once a run completes; OUTPUT_DIR is the config's output_dir with sft.py's device prefix
# (outputs/gpu_SFT_...). Requeue on it; the same command resumes from that checkpoint:
#   #SBATCH --requeue --signal=TERM@120       # SIGTERM to the ranks 2 minutes before the time limit
#   srun bash -c '...as above...'
#   [ -f outputs/gpu_SFT_Qwen2_5-VL-3B-Instruct_vqa_bbox/PREEMPTED ] && scontrol requeue "$SLURM_JOB_ID"
#
# Every node needs the repo, environment, model and data at the same paths. Put output_dir on storage
# all nodes share: DeepSpeed checkpoints are written by every rank, and resuming reads them back.
set -euo pipefail
CONFIG=${1:?usage: bash scripts/sft_multinode.sh CONFIG.yaml [--any_key value ...]}
shift
: "${NUM_NODES:?set NUM_NODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0 on the master node)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
MASTER_PORT=${MASTER_PORT:-25001}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
cd "$(dirname "$0")/.."

# --num_processes is the total over all nodes; the standard launcher runs torchrun on each node.
accelerate launch \
    --config_file "${DEEPSPEED_CONFIG:-configs/deepspeed_bf16_zero2.yaml}" \
    --num_machines "$NUM_NODES" \
    --machine_rank "$NODE_RANK" \
    --main_process_ip "$MASTER_ADDR" \
    --main_process_port "$MASTER_PORT" \
    --num_processes $((NUM_NODES * GPUS_PER_NODE)) \
    --deepspeed_multinode_launcher standard \
    ${MIXED_PRECISION:+--mixed_precision "$MIXED_PRECISION"} \
    "${TRAIN_SCRIPT:-sft.py}" --config "$CONFIG" "$@"
