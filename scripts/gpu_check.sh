#!/usr/bin/env bash
# One prepared check for a machine with one NVIDIA GPU: the speed and memory figures docs/benchmarks.md lacks,
# and whether packing and Liger leave the training loss unchanged (docs/reading_gpu_check.md says how to read it).
#
#   pip install -r requirements.txt -r requirements-gpu.txt   # the second is optional (Liger)
#   bash scripts/gpu_check.sh          # ~8 minutes; writes gpu_check.md and prints it
#   bash scripts/gpu_check.sh --quick  # the same commands on CPU with the tiny model, toy sizes (the test suite)
#
# It runs in whatever Python environment it finds (PYTHON, default python) and skips, with a note, any
# part whose package is missing (Liger, flash-attention), so an older preinstalled stack still gives
# figures. Every part is scripts/benchmark.py: 3B architecture, random init, bf16, TextVQA-sized images; the last
# one, when vLLM is installed and a model dir is given, is scripts/benchmark_serving.py: vLLM against HF generate
# on that model (samples/s, answers equal), on synthetic samples.
# Environment: GPU_CHECK_OUT (default gpu_check.md), GPU_CHECK_MODEL (a model dir whose processor, i.e.
# tokenizer, is used; default: the downloaded 3B if present, else the tiny model built on the fly).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-gpu_check.md}
PART_TIMEOUT=${PART_TIMEOUT:-150}  # seconds per part, so one stuck part cannot eat the whole check

if [ "${1:-}" = "--quick" ]; then
    COMMON=(--device cpu --num_samples 4 --rounds 1 --inference_samples 2 --new_tokens 2 --loading_sides 112)
    BATCH=2 SMALL=(112 256) LARGE=(224 512)  # max_image_side and max_seq_length
    SPEED_ROUNDS=2 PARITY_STEPS=2
else
    COMMON=(--device cuda --arch 3b --num_samples 32 --rounds 2 --inference_samples 32 --new_tokens 24)
    BATCH=8 SMALL=(256 256) LARGE=(1024 1536)
    # The fast config's padding is decided at SMALL: more interleaved rounds there, so the median ratio survives noise.
    SPEED_ROUNDS=5 PARITY_STEPS=3
fi
MODEL=${GPU_CHECK_MODEL:-}
if [ -z "$MODEL" ] && [ "${1:-}" != "--quick" ] && [ -d models/Qwen2.5-VL-3B-Instruct ]; then
    MODEL=models/Qwen2.5-VL-3B-Instruct
fi
if [ -n "$MODEL" ]; then COMMON+=(--model "$MODEL"); fi

has() { "$PYTHON" -c "import $1" 2>/dev/null; }
ATTN=(sdpa)
if has flash_attn; then ATTN+=(flash_attention_2); fi

part() {  # part TITLE ARGS...: one benchmark run, its tables appended; a failure is noted, not fatal
    local title=$1
    shift
    echo -e "\n# $title\n" >> "$OUT"
    if ! timeout "$PART_TIMEOUT" "$PYTHON" scripts/benchmark.py "${COMMON[@]}" "$@" >> "$OUT" 2> "$OUT.err"; then
        echo "**FAILED** (an error, or over PART_TIMEOUT=$PART_TIMEOUT s); last lines of its stderr:" >> "$OUT"
        tail -n 5 "$OUT.err" | sed 's/^/    /' >> "$OUT"
    fi
}

{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "command: bash scripts/gpu_check.sh $*"
    if command -v nvidia-smi > /dev/null; then
        echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)"
    else
        echo "GPU: none (nvidia-smi not found)"
    fi
    echo "Python: $("$PYTHON" --version 2>&1); processor of: ${MODEL:-the tiny model (its token counts differ from the real tokenizer)}"
    has liger_kernel || echo "Skipped: Liger rows (liger-kernel not installed: pip install -r requirements-gpu.txt)"
    has flash_attn || echo "Skipped: flash_attention_2 rows (flash-attn not installed; it has no wheel on the index)"
    has vllm || echo "Skipped: vLLM vs HF generate (vllm not installed: pip install vllm)"
    [ -n "$MODEL" ] || echo "Skipped: vLLM vs HF generate (no model dir: GPU_CHECK_MODEL or models/Qwen2.5-VL-3B-Instruct)"
    echo "DeepSpeed is not used here: one GPU needs no ZeRO."
} > "$OUT"

full_finetuning() {  # full_finetuning TITLE SIDE SEQ_LENGTH BATCH [more flags]: tutorial layout vs larger batches
    local title=$1 side=$2 seq_length=$3 batch=$4
    shift 4
    part "$title" --max_image_side "$side" --max_seq_length "$seq_length" \
        --layouts max_length:1 "longest:$batch" "packed:$batch" --attn "${ATTN[@]}" "$@"
}
part "Loss parity at max_image_side ${SMALL[0]}: the first $PARITY_STEPS steps by padding layout, and without vs with Liger" \
    --parity_steps "$PARITY_STEPS" --batch_size "$BATCH" --skip loading encode training inference \
    --max_image_side "${SMALL[0]}" --max_seq_length "${SMALL[1]}"
full_finetuning "max_image_side ${SMALL[0]}: data loading, full fine-tuning, inference" "${SMALL[@]}" "$BATCH" \
    --rounds "$SPEED_ROUNDS"
full_finetuning "max_image_side ${LARGE[0]}: full fine-tuning" "${LARGE[@]}" $((BATCH / 2)) --skip loading encode inference
if has liger_kernel; then
    full_finetuning "max_image_side ${SMALL[0]}, Liger kernels" "${SMALL[@]}" "$BATCH" --liger --skip loading encode inference \
        --rounds "$SPEED_ROUNDS"
    full_finetuning "max_image_side ${LARGE[0]}, Liger kernels" "${LARGE[@]}" $((BATCH / 2)) --liger --skip loading encode inference
fi
part "LoRA, the 24 GB config (configs/SFT_Qwen2_5-VL-3B-Instruct_vqa_lora.yaml: batch 4, gradient checkpointing)" \
    --lora --gradient_checkpointing --skip loading encode inference --max_image_side "${SMALL[0]}" --max_seq_length "${SMALL[1]}" --layouts longest:4

serving() {  # vLLM and HF generate on the same model and samples: scripts/benchmark_serving.py, its table appended
    local data
    data=$(mktemp -d)
    echo -e "\n# Serving: vLLM vs HF generate on $MODEL\n" >> "$OUT"
    if ! { "$PYTHON" scripts/make_synthetic_data.py --output_dir "$data/raw" --num_samples 64 --seed 5 &&
        "$PYTHON" scripts/convert2sft_format.py --data_path "$data/raw" --save_path "$data" --type test \
            --test_range 0:64 --num_workers 1 &&
        timeout $((3 * PART_TIMEOUT)) "$PYTHON" scripts/benchmark_serving.py --model_name_or_path "$MODEL" \
            --test_dataset_name "$data/test.jsonl" --server vllm --device cuda --limit 64 --batch_sizes 1 16 \
            --concurrency 1 4 16 --server_log "$OUT.vllm.log" >> "$OUT"; } > /dev/null 2> "$OUT.err"; then
        echo "**FAILED** (an error, or over $((3 * PART_TIMEOUT)) s); last lines of its stderr:" >> "$OUT"
        tail -n 5 "$OUT.err" | sed 's/^/    /' >> "$OUT"
    fi
    rm -rf "$data"
}
if has vllm && [ -n "$MODEL" ]; then serving; fi

rm -f "$OUT.err"
cat "$OUT"
