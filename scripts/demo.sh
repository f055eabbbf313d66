#!/usr/bin/env bash
# The repo's whole job on a laptop CPU, no GPU and no downloads: a tiny Qwen2.5-VL (random weights)
# learns grounding from synthetic TextVQA-schema images through the real converter, sft.py and infer.py.
#
#   bash scripts/demo.sh                    # about 15 minutes on 2 CPU cores
#   bash scripts/demo.sh --family qwen3_vl  # the same with a tiny Qwen3-VL (answers in 0-1000)
#   bash scripts/demo.sh --family qwen3_5   # the same with a tiny Qwen3.5 (Gated DeltaNet layers, answers in 0-1000; ~26 min)
#   bash scripts/demo.sh --num_samples 64 --num_test 16 --num_val 8 --max_steps 20 --workdir /tmp/demo   # a quick look
#   bash scripts/demo.sh --workdir runs/other -- --colors purple cyan --clutter   # after --: make_synthetic_data.py flags
#   bash scripts/demo.sh --grpo             # then GRPO from the SFT model (grpo.py, configs/demo_grpo_tiny_cpu.yaml)
#   bash scripts/demo.sh --task detect      # every box: 1-4 shapes per image, list answers (docs/detect.md)
#
# --task detect draws COCO-style data (make_synthetic_data.py --schema coco), converts it with
# convert2sft_format.py --task detect (a row per category and per colour/shape group, negatives answered []),
# trains configs/demo_detect_tiny_cpu.yaml and scores the list answers; beside it, the single-box model of
# the plain demo run in the same --workdir (or --single_box_model DIR) is scored on the same test rows.
#
# --workdir DIR (default: the repo) receives models/, data/ and outputs/ exactly where
# configs/demo_tiny_cpu.yaml expects them, so `python sft.py --config configs/demo_tiny_cpu.yaml`
# works by hand afterwards. The recipe (image side, batch, steps, learning rate) is that config.
set -euo pipefail

CONFIG=configs/demo_tiny_cpu.yaml
NUM_SAMPLES=3000  # training samples; the test split comes after them
NUM_TEST=""       # empty: 200 test images (100 with --task detect, each of which gives ~6 rows)
NUM_VAL=100       # the validation split, after the test split: the config's test_dataset_name, never the test images
MAX_STEPS=""      # empty: the config's max_steps
BATCH_SIZE=""     # empty: the config's per_device_train_batch_size
MAX_IMAGE_SIDE="" # empty: the config's max_image_side
WORKDIR=.
FAMILY=qwen2_5_vl  # scripts/make_tiny_model.py --family
GRPO=""           # non-empty: continue from the SFT model with GRPO, evaluate it too
TASK=grounding    # or detect: several boxes per answer
SINGLE_BOX_MODEL=""  # --task detect: the single-box model to score beside it (default: the plain demo's, if run)
EXTRA_DATA_FLAGS=()  # after --: make_synthetic_data.py flags, appended to the task's, so they override them
while [ $# -gt 0 ]; do
    case "$1" in
        --num_samples) NUM_SAMPLES="$2"; shift 2 ;;
        --num_test) NUM_TEST="$2"; shift 2 ;;
        --num_val) NUM_VAL="$2"; shift 2 ;;
        --max_steps) MAX_STEPS="$2"; shift 2 ;;
        --batch_size) BATCH_SIZE="$2"; shift 2 ;;
        --max_image_side) MAX_IMAGE_SIDE="$2"; shift 2 ;;
        --workdir) WORKDIR="$2"; shift 2 ;;
        --family) FAMILY="$2"; shift 2 ;;
        --grpo) GRPO=1; shift ;;
        --task) TASK="$2"; shift 2 ;;
        --single_box_model) SINGLE_BOX_MODEL="$2"; shift 2 ;;
        --) shift; EXTRA_DATA_FLAGS=("$@"); break ;;
        *) echo "demo.sh: unknown argument '$1' (flags: --num_samples --num_test --num_val --max_steps --batch_size --max_image_side --workdir --family --grpo --task --single_box_model, then -- and make_synthetic_data.py flags)" >&2; exit 2 ;;
    esac
done
case "$TASK" in
    # One named shape per image, its side a tenth to half of the image's short side, drawn uniformly in log
    # scale so that a quarter of the targets have a side under 15% of it (the results' "side < 15%" column;
    # TextVQA's text boxes are about a tenth). Distractors make the task harder (docs/demo.md).
    grounding) DATA_FLAGS=(--max_distractors 0 --min_object 0.1 --max_object 0.5 --sizes log); NUM_TEST="${NUM_TEST:-200}" ;;
    # 1-4 shapes per image, half of them repeating a category already drawn, sides 150-640 px (docs/detect.md).
    detect) CONFIG=configs/demo_detect_tiny_cpu.yaml; NUM_TEST="${NUM_TEST:-100}"
        DATA_FLAGS=(--schema coco --max_objects 4 --min_object 0.15 --max_object 0.35 --min_side 150 --max_side 640) ;;
    *) echo "demo.sh: unknown --task '$TASK' (grounding or detect)" >&2; exit 2 ;;
esac
DATA_FLAGS+=("${EXTRA_DATA_FLAGS[@]}")
WORKDIR="$(mkdir -p "$WORKDIR" && cd "$WORKDIR" && pwd)"  # absolute: setup_env.sh moves to the repo root
set --  # setup_env.sh would read leftover arguments as packages to install
source "$(dirname "$0")/setup_env.sh"

case "$FAMILY" in  # each family's model and runs in their own folders
    qwen2_5_vl) MODEL="$WORKDIR/models/tiny-qwen2.5-vl"; RUN=demo_tiny_cpu; EVAL="$WORKDIR/outputs/demo_eval" ;;
    qwen3_vl) MODEL="$WORKDIR/models/tiny-qwen3-vl"; RUN=demo_tiny_cpu_qwen3_vl; EVAL="$WORKDIR/outputs/demo_eval_qwen3_vl" ;;
    qwen3_5) MODEL="$WORKDIR/models/tiny-qwen3.5"; RUN=demo_tiny_cpu_qwen3_5; EVAL="$WORKDIR/outputs/demo_eval_qwen3_5" ;;
    *) echo "demo.sh: unknown --family '$FAMILY' (qwen2_5_vl, qwen3_vl or qwen3_5)" >&2; exit 2 ;;
esac
SOURCE="$WORKDIR/data/demo_source"  # the synthetic dataset in TextVQA_GT_bbox's own layout
DATA="$WORKDIR/data/demo"           # the converter's JSONL + images
TRAINED="$WORKDIR/outputs/cpu_$RUN"  # sft.py prefixes output_dir's name with the device
if [ "$TASK" = detect ]; then  # its own folders, beside the plain demo's (whose model it is compared with)
    [ -z "$GRPO" ] || { echo "demo.sh: --grpo runs on the plain demo only, not with --task detect" >&2; exit 2; }
    SINGLE_BOX_MODEL="${SINGLE_BOX_MODEL:-$TRAINED}"
    RUN="${RUN/demo_tiny/demo_detect_tiny}"; EVAL="${EVAL/demo_eval/demo_detect_eval}"
    SOURCE="$WORKDIR/data/demo_detect_source"; DATA="$WORKDIR/data/demo_detect"; TRAINED="$WORKDIR/outputs/cpu_$RUN"
fi
GRPO_RUN="${RUN/demo_tiny/demo_grpo_tiny}"  # demo_grpo_tiny_cpu[_qwen3_vl]
GRPO_TRAINED="$WORKDIR/outputs/cpu_$GRPO_RUN"
MAX_IMAGE_SIDE="${MAX_IMAGE_SIDE:-$(python -c "import yaml; print(yaml.safe_load(open('$CONFIG'))['max_image_side'])")}"

STAGE_TIMES=()
stage() {  # stage NAME COMMAND...: run one step of the pipeline, timed
    local name="$1" start=$SECONDS
    shift
    echo
    echo "==> [demo] $name"
    echo "    $*"
    "$@"
    STAGE_TIMES+=("$(printf '%-34s %5d s' "$name" $((SECONDS - start)))")
}

print_stage_times() {
    echo
    echo "time per stage:"
    printf '  %s\n' "${STAGE_TIMES[@]}"
    echo "  total                              $(printf '%5d' $SECONDS) s"
    echo
}

eval_stage() {  # eval_stage NAME MODEL FOLDER MAX_NEW_TOKENS [infer.py flags]: infer.py on the test rows, into $EVAL/FOLDER
    local name="$1" model="$2" folder="$3" max_new_tokens="$4"
    shift 4
    stage "$name" python infer.py --model_name_or_path "$model" --test_dataset_name "$DATA/test.jsonl" \
        --output_dir "$EVAL/$folder" --max_new_tokens "$max_new_tokens" "$@"
}

[ "$TASK" = detect ] && NUM_STAGES=5 || NUM_STAGES=7
train_stage() {  # train_stage NUMBER: sft.py with the recipe, on the converted data
    stage "$1/$NUM_STAGES train (sft.py --config $CONFIG)" \
        python sft.py --config "$CONFIG" --model_name_or_path "$MODEL" \
        --train_dataset_name "$DATA/train.jsonl" --test_dataset_name "$DATA/val.jsonl" \
        --output_dir "$WORKDIR/outputs/$RUN" --overwrite_output_dir true --max_image_side "$MAX_IMAGE_SIDE" ${MAX_STEPS:+--max_steps "$MAX_STEPS"} \
        ${BATCH_SIZE:+--per_device_train_batch_size "$BATCH_SIZE"}
}

stage "1/$NUM_STAGES build the tiny model" \
    python scripts/make_tiny_model.py --family "$FAMILY" --output_dir "$MODEL"
stage "2/$NUM_STAGES draw the synthetic dataset" \
    python scripts/make_synthetic_data.py --output_dir "$SOURCE" --num_samples $((NUM_SAMPLES + NUM_TEST + NUM_VAL)) "${DATA_FLAGS[@]}"
RANGES=(--train_range "0:$NUM_SAMPLES" --test_range "$NUM_SAMPLES:$((NUM_SAMPLES + NUM_TEST))"
        --val_range "$((NUM_SAMPLES + NUM_TEST)):$((NUM_SAMPLES + NUM_TEST + NUM_VAL))")
if [ "$TASK" = detect ]; then
    stage "3/5 convert it to JSONL (--task detect: a row per category and group, 0.25 negatives per row)" \
        python scripts/convert2sft_format.py --task detect --data_path "$SOURCE/instances.json" --save_path "$DATA" \
        --groups "$SOURCE/groups.json" --negatives 0.25 "${RANGES[@]}"
    train_stage 4
    # Up to 4 boxes of ~40 tokens each, and room to see a model that does not stop.
    eval_stage "5/5 evaluate the trained model" "$TRAINED" trained 200
    if [ -d "$SINGLE_BOX_MODEL" ]; then
        eval_stage "+ the single-box model on the same test rows" "$SINGLE_BOX_MODEL" single_box 200
    else
        echo "no single-box model at $SINGLE_BOX_MODEL (run bash scripts/demo.sh with the same --workdir first): not compared"
    fi
    echo
    echo "==> [demo] results on the test rows of the $NUM_TEST held-back test images"
    python - "$EVAL" <<'EOF'
import json, os, sys

print("| predictor | F1@0.5 | precision@0.5 | recall@0.5 | recall@0.5, 2+ true objects (boxes) | rejection acc (rows) | malformed |")
print("|---|---|---|---|---|---|---|")
for name, folder in (("trained on lists (--task detect)", "trained"), ("single-box model of the plain demo", "single_box")):
    path = os.path.join(sys.argv[1], folder, "metrics.json")
    if not os.path.isfile(path):
        continue
    with open(path) as f:
        m = json.load(f)
    several = [m["by_count"][bucket] for bucket in ("2-3", "4+")]  # the rows with 2 or more true objects
    true_boxes = sum(bucket["true_boxes"] for bucket in several)
    matched = sum(bucket["recall@0.5"] * bucket["true_boxes"] for bucket in several if bucket["true_boxes"])
    recall = f"{matched / true_boxes:.3f} ({true_boxes})" if true_boxes else "- (0)"
    cells = [f"{m[key]:.3f}" if m[key] is not None else "-" for key in ("f1@0.5", "precision@0.5", "recall@0.5")]
    rejection = "-" if m["rejection_acc"] is None else f"{m['rejection_acc']:.3f}"
    print(f"| {name} | {' | '.join(cells)} | {recall} | {rejection} ({m['by_count']['0']['count']}) | {m['malformed_answers']} |")
EOF
    print_stage_times
    echo "pictures (red: prediction, green: matched truth, orange: missed truth): $EVAL/trained/vis/grid.jpg"
    echo "predictions and metrics: $EVAL/trained/{predictions.jsonl,metrics.json}; trained model: $TRAINED"
    echo "the real model on a COCO-style set: configs/SFT_Qwen2_5-VL-3B-Instruct_detect.yaml (docs/detect.md)"
    exit 0
fi
stage "3/7 convert it to JSONL" \
    python scripts/convert2sft_format.py --data_path "$SOURCE" --save_path "$DATA" "${RANGES[@]}"
stage "4/7 baseline: the mean training box" \
    python scripts/mean_box_baseline.py --train_dataset_name "$DATA/train.jsonl" \
    --test_dataset_name "$DATA/test.jsonl" --output_dir "$EVAL/mean_box"
# The untrained model shows what the architecture alone scores; it rarely even writes a box.
eval_stage "5/7 baseline: the untrained model" "$MODEL" untrained 48 --max_image_side "$MAX_IMAGE_SIDE"
train_stage 6
eval_stage "7/7 evaluate the trained model" "$TRAINED" trained 48
if [ -n "$GRPO" ]; then
    stage "+1 GRPO from the SFT model (grpo.py --config configs/demo_grpo_tiny_cpu.yaml)" \
        python grpo.py --config configs/demo_grpo_tiny_cpu.yaml --model_name_or_path "$TRAINED" \
        --train_dataset_name "$DATA/train.jsonl" --output_dir "$WORKDIR/outputs/$GRPO_RUN" --overwrite_output_dir true
    eval_stage "+2 evaluate the GRPO model" "$GRPO_TRAINED" grpo 48
fi

echo
echo "==> [demo] results on the $NUM_TEST held-back test images"
python - "$EVAL" "$GRPO" <<'EOF'
import json, os, sys

from scoring import SIDE_BUCKETS, SIZE_BUCKETS, TARGET_SIDE_CUT, acc_by_target_side

side_columns = " | ".join(f"Acc@0.5 {name} (n)" for name in SIDE_BUCKETS)
print(f"| predictor | Acc@0.5 | Acc@0.75 | mean IoU | {side_columns} | no box parsed |")
print("|---|---|---|---|---|---|---|")
grpo = (("trained tiny model + GRPO", "grpo"),) if sys.argv[2] else ()
for name, folder in (*grpo, ("trained tiny model", "trained"), ("untrained tiny model", "untrained"), ("mean training box", "mean_box")):
    with open(os.path.join(sys.argv[1], folder, "metrics.json")) as f:
        m = json.load(f)
    with open(os.path.join(sys.argv[1], folder, "predictions.jsonl")) as f:
        by_side = acc_by_target_side(map(json.loads, f))
    cells = " | ".join(f"{acc:.3f} ({n})" if n else "- (0)" for acc, n in by_side.values())
    print(f"| {name} | {m['acc@0.5']:.3f} | {m['acc@0.75']:.3f} | {m['mean_iou']:.3f} | {cells} | {m['parse_failures']} |")
print(f"{SIDE_BUCKETS[0]}: the true box's longer side is under {TARGET_SIDE_CUT:.0%} of the image's short side "
      f"(infer.py's {'/'.join(SIZE_BUCKETS)} split by area instead)")
EOF
print_stage_times
echo "pictures (green: truth, red: prediction): $EVAL/trained/vis/grid.jpg"
echo "predictions and metrics: $EVAL/trained/{predictions.jsonl,metrics.json}; trained model: $TRAINED"
[ -z "$GRPO" ] || echo "after GRPO: $EVAL/grpo/{predictions.jsonl,metrics.json}; model: $GRPO_TRAINED"
cat <<'EOF'

The same pipeline on the real model (Qwen2.5-VL-3B-Instruct, TextVQA_GT_bbox, 8 GPUs):
  bash scripts/download_model.sh && bash scripts/download_data.sh
  python scripts/convert2sft_format.py --data_path ./data/textvqa_bbox --save_path ./data
  bash scripts/sft_vqa_8gpu-z2.sh configs/SFT_Qwen2_5-VL-3B-Instruct_vqa.yaml
  python infer.py --model_name_or_path ./outputs/gpu_SFT_Qwen2_5-VL-3B-Instruct_vqa_bbox \
      --test_dataset_name ./data/test.jsonl --output_dir ./outputs/eval_3b
EOF
