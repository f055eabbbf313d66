#!/usr/bin/env bash
# Does grounding SFT cost what the model knew, and does mixing general rows back in keep it? (issue #31)
# On CPU with the tiny model, no download:
#   1. the tiny model (random weights) first learns a general task: colour, shape and count questions about
#      synthetic images, answered by a word (make_synthetic_data.py --general_questions, converted with
#      --task vqa). That model is "base";
#   2. base is then fine-tuned for grounding (the reduced demo's data: a red or blue square per 112 px image):
#      (a) grounding only; (b) grounding mixed with 10% and (c) 30% general rows (train_dataset_weights). Every
#      run trains the same number of epochs of the grounding rows, so a mix adds its general rows on top;
#   3. every model is scored on one test file holding both tasks (infer.py): grounding Acc@0.5 and the general
#      task's VQA accuracy. compare_evals.py --retention writes the table, plot_retention_study.py the chart.
#
#   bash scripts/retention_study.sh                       # docs/retention.md has its figures and time
#   bash scripts/retention_study.sh --workdir /tmp/rs --general_steps 50 --grounding_epochs 1   # a quick look
set -euo pipefail

WORKDIR=outputs/retention
GENERAL_STEPS=400     # step 1, batch 16, at GENERAL_LR (2e-3 for 700 steps did little better: docs/retention.md)
GENERAL_LR=5.0e-3
GROUNDING_EPOCHS=5    # step 2, of the grounding rows, batch 16
NUM_GENERAL=1600      # general task training images (its test images: 200 more)
NUM_GROUNDING=1000    # grounding training images (its test images: 100 more)
while [ $# -gt 0 ]; do
    case "$1" in
        --workdir) WORKDIR="$2"; shift 2 ;;
        --general_steps) GENERAL_STEPS="$2"; shift 2 ;;
        --grounding_epochs) GROUNDING_EPOCHS="$2"; shift 2 ;;
        *) echo "retention_study.sh: unknown argument '$1' (flags: --workdir --general_steps --grounding_epochs)" >&2; exit 2 ;;
    esac
done
WORKDIR="$(mkdir -p "$WORKDIR" && cd "$WORKDIR" && pwd)"  # absolute: setup_env.sh moves to the repo root
set --  # setup_env.sh would read leftover arguments as packages to install
source "$(dirname "$0")/setup_env.sh"
# One thread: the tiny model's small matrices gain nothing from more, and on a shared 2-core machine two threads
# ran 6x slower (0.3 against 1.75 steps/s, measured here while other jobs ran).
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 SWANLAB_MODE=disabled

MODEL="$WORKDIR/models/tiny-qwen2.5-vl"
DATA="$WORKDIR/data"  # both tasks' JSONL side by side: {train,test}.jsonl (grounding), {train,test}_vqa.jsonl
RUNS="$WORKDIR/outputs"
EVAL="$WORKDIR/eval"
# The demo's config (lr 2e-3 cosine, float32) at the reduced demo's 112 px and batch 16.
RECIPE=(--config configs/demo_tiny_cpu.yaml --max_image_side 112 --per_device_train_batch_size 16 --overwrite_output_dir true)
STAGE_TIMES=()
stage() {  # stage NAME COMMAND...: run one step, timed
    local name="$1" start=$SECONDS
    shift
    echo
    echo "==> [retention] $name"
    echo "    $*"
    "$@"
    STAGE_TIMES+=("$(printf '%-40s %5d s' "$name" $((SECONDS - start)))")
}

stage "build the tiny model" python scripts/make_tiny_model.py --output_dir "$MODEL"
stage "draw the general task" python scripts/make_synthetic_data.py --output_dir "$WORKDIR/general_source" \
    --general_questions --num_samples $((NUM_GENERAL + 300)) --max_side 112 --min_object 0.25 --max_object 0.35 \
    --colors red green blue yellow --shapes square circle triangle --seed 1
stage "convert it (--task vqa)" python scripts/convert2sft_format.py --data_path "$WORKDIR/general_source" \
    --save_path "$DATA" --task vqa --train_range "0:$NUM_GENERAL" --test_range "$NUM_GENERAL:$((NUM_GENERAL + 200))" \
    --val_range "$((NUM_GENERAL + 200)):$((NUM_GENERAL + 300))"
stage "draw the grounding task" python scripts/make_synthetic_data.py --output_dir "$WORKDIR/grounding_source" \
    --num_samples $((NUM_GROUNDING + 150)) --min_side 112 --max_side 112 --min_object 0.3 --max_object 0.5 \
    --max_distractors 0 --shapes square --colors red blue --seed 2
stage "convert it" python scripts/convert2sft_format.py --data_path "$WORKDIR/grounding_source" --save_path "$DATA" \
    --train_range "0:$NUM_GROUNDING" --test_range "$NUM_GROUNDING:$((NUM_GROUNDING + 100))" \
    --val_range "$((NUM_GROUNDING + 100)):$((NUM_GROUNDING + 150))"
cat "$DATA/test.jsonl" "$DATA/test_vqa.jsonl" > "$DATA/test_both.jsonl"  # image paths are relative to $DATA

stage "1. learn the general task (base)" python sft.py "${RECIPE[@]}" --model_name_or_path "$MODEL" \
    --train_dataset_name "$DATA/train_vqa.jsonl" --max_steps "$GENERAL_STEPS" --learning_rate "$GENERAL_LR" \
    --output_dir "$RUNS/base"
declare -A MIXES=([grounding_only]="" [mix10]="0.9 0.1" [mix30]="0.7 0.3")
for run in grounding_only mix10 mix30; do
    files=("$DATA/train.jsonl")
    [ -z "${MIXES[$run]}" ] || files+=("$DATA/train_vqa.jsonl" --train_dataset_weights ${MIXES[$run]})
    stage "2. grounding SFT: $run" python sft.py "${RECIPE[@]}" --model_name_or_path "$RUNS/cpu_base" \
        --train_dataset_name "${files[@]}" --max_steps -1 --num_train_epochs "$GROUNDING_EPOCHS" --output_dir "$RUNS/$run"
done
for run in base grounding_only mix10 mix30; do
    stage "3. evaluate $run" python infer.py --model_name_or_path "$RUNS/cpu_$run" \
        --test_dataset_name "$DATA/test_both.jsonl" --output_dir "$EVAL/$run" --max_new_tokens 40 --batch_size 50 --num_vis 8
done

echo
python scripts/compare_evals.py --retention "$EVAL/base" "$EVAL/grounding_only" "$EVAL/mix10" "$EVAL/mix30" \
    --output "$WORKDIR/retention.md"
python scripts/plot_retention_study.py --output "$WORKDIR/retention_study.png" "before grounding SFT=$EVAL/base" \
    "grounding only=$EVAL/grounding_only" "mixed, 10% general=$EVAL/mix10" "mixed, 30% general=$EVAL/mix30"
echo
echo "time per stage:"
printf '  %s\n' "${STAGE_TIMES[@]}"
echo "  total                                    $(printf '%5d' $SECONDS) s"
