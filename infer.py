"""Evaluate a grounding model on the converter's JSONL: predictions, Acc@IoU, mean IoU and pictures.

    python infer.py --model_name_or_path outputs/merged --test_dataset_name data/test.jsonl --output_dir outputs/eval
    python infer.py --model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct --adapter outputs/lora \\
        --test_dataset_name data/test.jsonl --output_dir outputs/eval_lora
    accelerate launch infer.py ...   # the test set is split across processes, one merged result

A base model works too (zero-shot). The prompt and the image resize are training's (utils.py and
the grounding_image_settings.json saved beside the model); predicted boxes are mapped back to
original pixels before scoring. OUT receives predictions.jsonl, metrics.json and vis/.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import warnings

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from peft import PeftModel
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from model_families import box_from_answer, check_settings_family, detect_family
from utils import (
    DEFAULT_MAX_IMAGE_SIDE,
    IMAGE_SETTINGS_FILE,
    ImageSettings,
    box_ious,
    build_messages,
    check_processor_kept_frame,
    load_image,
    load_sft_jsonl,
    parse_bbox,
    processor_dir,
    read_answer_box,
    to_model_frame,
    write_json_atomic,
)

TRUE_COLOR, PREDICTED_COLOR = (0, 200, 0), (230, 0, 0)
GRID_COLUMNS, GRID_CELL = 4, 320


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="a full model: base, fine-tuned or merged")
    parser.add_argument("--adapter", help="a LoRA adapter dir to apply on top of --model_name_or_path")
    parser.add_argument("--test_dataset_name", required=True, help="the converter's test.jsonl")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=16, help="per process")
    parser.add_argument("--max_image_side", type=int, help=f"default: training's value from {IMAGE_SETTINGS_FILE}")
    parser.add_argument("--limit", type=int, help="only the first N test samples")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--num_vis", type=int, default=16, help="pictures drawn into OUT/vis")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--report_to", default="none", choices=["none", "swanlab"])
    parser.add_argument("--run_name", help="SwanLab experiment name (default: eval-<model dir name>)")
    return parser.parse_args()


def resolve_image_settings(processor, settings_dirs, max_image_side, family) -> ImageSettings:
    """--max_image_side > the settings saved by training (first dir that has them) > a default, with warnings.
    Saved settings of another coordinate system than the model family's raise ValueError."""
    found = [(d, s) for d in settings_dirs if (s := ImageSettings.load(d)) is not None]
    if found:
        check_settings_family(found[0][1], family, found[0][0])
    if max_image_side is None:
        if found:
            return found[0][1]
        warnings.warn(
            f"no {IMAGE_SETTINGS_FILE} in {' or '.join(settings_dirs)}: the training's image size is unknown, "
            f"using max_image_side={DEFAULT_MAX_IMAGE_SIDE}. Pass --max_image_side to match training."
        )
        return ImageSettings.from_processor(processor, DEFAULT_MAX_IMAGE_SIDE, family)
    if not found:
        return ImageSettings.from_processor(processor, max_image_side, family)
    directory, saved = found[0]
    if saved.max_image_side != max_image_side:
        warnings.warn(
            f"--max_image_side {max_image_side} differs from the {saved.max_image_side} the model was trained with "
            f"({os.path.join(directory, IMAGE_SETTINGS_FILE)})"
        )
    return dataclasses.replace(saved, max_image_side=max_image_side)


def read_true_boxes(path, rows) -> list[list[float]]:
    """Every row's true box (original pixels); a missing image or bad answer exits naming the sample."""
    true_boxes = []
    for number, row in enumerate(rows, start=1):
        where = f"{path}: sample {number} ({row['image'][0]})"
        if not os.path.isfile(row["image"][0]):
            raise SystemExit(f"{where}: image not found")
        try:
            true_boxes.append(read_answer_box(row["assistant"]))
        except ValueError as error:
            raise SystemExit(f"{where}: {error}") from error
    return true_boxes


@torch.no_grad()
def predict(model, processor, rows, settings, batch_size, max_new_tokens, show_progress=True) -> list[dict]:
    """Greedy generation in batches; returns {"raw_output", "pred_bbox"} per row, boxes in original pixels."""
    processor.tokenizer.padding_side = "left"  # generation continues from the last position of every row
    patch_size = processor.image_processor.patch_size
    predictions = []
    for start in tqdm(range(0, len(rows), batch_size), desc="generating", disable=not show_progress):
        batch = rows[start : start + batch_size]
        originals = [load_image(row["image"][0]) for row in batch]
        images = [to_model_frame(image, settings) for image in originals]
        prompts = [
            processor.apply_chat_template(build_messages(row["user"]), add_generation_prompt=True) for row in batch
        ]
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt").to(model.device)
        for row, image, image_grid_thw in zip(batch, images, inputs["image_grid_thw"].tolist()):
            check_processor_kept_frame(row["image"][0], image.size, image_grid_thw, patch_size)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for text, image, original in zip(texts, images, originals):
            box = parse_bbox(text)
            box = None if box is None else box_from_answer(box, settings.coordinate_system, image.size, original.size)
            predictions.append({"raw_output": text, "pred_bbox": box})
    return predictions


def evaluate(rows, true_boxes, predictions) -> tuple[list[dict], dict]:
    """Per-sample records for predictions.jsonl and the metrics; an unparsed answer scores IoU 0."""
    predicted_boxes = [p["pred_bbox"] for p in predictions]
    ious = box_ious(predicted_boxes, true_boxes)
    records = [
        {
            "image": row["image"][0],
            "query": row["user"],
            "gt_bbox": true_box,
            "pred_bbox": prediction["pred_bbox"],
            "iou": iou,
            "raw_output": prediction["raw_output"],
        }
        for row, true_box, prediction, iou in zip(rows, true_boxes, predictions, ious)
    ]
    metrics = {
        "num_samples": len(records),
        "acc@0.5": sum(iou >= 0.5 for iou in ious) / len(ious),
        "acc@0.75": sum(iou >= 0.75 for iou in ious) / len(ious),
        "mean_iou": sum(ious) / len(ious),
        "parse_failures": sum(box is None for box in predicted_boxes),
    }
    return records, metrics


def draw_prediction(record) -> Image.Image:
    """The original image with the true box (green) and the predicted box (red), captioned below."""
    image = load_image(record["image"])
    width, height = image.size
    line_width = max(2, round(max(width, height) / 250))
    margin = line_width + 1  # room for a box's line outside the image edge
    # Sized to the image, so captions stay legible once grid.jpg shrinks every picture to one cell.
    font = ImageFont.load_default(size=max(12, max(width, height) // 24))
    result = "no box parsed" if record["pred_bbox"] is None else f"IoU {record['iou']:.2f}"
    lines = [
        [(f"{result}   ", "black"), ("truth ", TRUE_COLOR), ("prediction", PREDICTED_COLOR)],
        [(record["query"], "black")],
    ]
    line_height = font.size + line_width
    text_width = math.ceil(max(sum(font.getlength(text) for text, _ in line) for line in lines))
    canvas_size = (max(width, text_width) + 2 * margin, height + 2 * margin + len(lines) * line_height)
    canvas = Image.new("RGB", canvas_size, "white")
    canvas.paste(image, (margin, margin))
    draw = ImageDraw.Draw(canvas)
    for box, color in ((record["gt_bbox"], TRUE_COLOR), (record["pred_bbox"], PREDICTED_COLOR)):
        if box is not None:
            # The line lies just outside the box's pixel edges (PIL's rectangle takes inclusive pixel
            # indices and grows its width inwards), so it never hides the object's own edge.
            x1, y1, x2, y2 = (v + margin for v in box)
            outer = (x1 - line_width, y1 - line_width, max(x1, x2 - 1) + line_width, max(y1, y2 - 1) + line_width)
            draw.rectangle(outer, outline=color, width=line_width)
    y = height + 2 * margin
    for line in lines:
        x = margin
        for text, color in line:
            draw.text((x, y), text, fill=color, font=font)
            x += font.getlength(text)
        y += line_height
    return canvas


def make_grid(pictures: list[Image.Image]) -> Image.Image:
    rows = math.ceil(len(pictures) / GRID_COLUMNS)
    grid = Image.new("RGB", (GRID_COLUMNS * GRID_CELL, rows * GRID_CELL), "white")
    for index, picture in enumerate(pictures):
        thumbnail = picture.copy()
        thumbnail.thumbnail((GRID_CELL - 8, GRID_CELL - 8))
        column, row = index % GRID_COLUMNS, index // GRID_COLUMNS
        grid.paste(thumbnail, (column * GRID_CELL + 4, row * GRID_CELL + 4))
    return grid


def save_pictures(records, output_dir, num_vis) -> list[str]:
    """Draw the first num_vis samples and their grid.jpg into OUT/vis (replaced whole); return the sample paths."""
    vis_dir = os.path.join(output_dir, "vis")
    tmp_dir = f"{vis_dir}.tmp-{os.getpid()}"
    os.makedirs(tmp_dir)
    pictures = [draw_prediction(record) for record in records[:num_vis]]
    names = [f"{index:05d}.jpg" for index in range(len(pictures))]
    for picture, name in zip(pictures, names):
        picture.save(os.path.join(tmp_dir, name), quality=90)
    if pictures:
        make_grid(pictures).save(os.path.join(tmp_dir, "grid.jpg"), quality=90)
    shutil.rmtree(vis_dir, ignore_errors=True)
    os.replace(tmp_dir, vis_dir)
    return [os.path.join(vis_dir, name) for name in names]


def write_jsonl_atomic(path, records) -> None:
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp_path, path)


def print_summary(model_name, metrics) -> None:
    print("\n| model | samples | acc@0.5 | acc@0.75 | mean IoU | parse failures |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {model_name} | {metrics['num_samples']} | {metrics['acc@0.5']:.4f} | {metrics['acc@0.75']:.4f} "
        f"| {metrics['mean_iou']:.4f} | {metrics['parse_failures']} |"
    )


def log_to_swanlab(args, model_name, metrics, picture_paths) -> None:
    import swanlab

    name = args.run_name or f"eval-{model_name}"
    swanlab.init(project=os.getenv("SWANLAB_PROJECT"), name=name, job_type="eval", config=vars(args))
    swanlab.log({f"eval/{key}": value for key, value in metrics.items()})
    if picture_paths:
        grid_path = os.path.join(os.path.dirname(picture_paths[0]), "grid.jpg")
        swanlab.log({"eval/grid": swanlab.Image(grid_path), "eval/samples": [swanlab.Image(p) for p in picture_paths]})
    swanlab.finish()


def main():
    args = parse_args()
    state = PartialState(cpu=not torch.accelerator.is_available())  # several CPU processes talk over gloo
    rows = load_sft_jsonl(args.test_dataset_name)[: args.limit]
    if not rows:
        raise SystemExit(f"{args.test_dataset_name}: no test samples")
    true_boxes = read_true_boxes(args.test_dataset_name, rows)  # before the model loads: fails in seconds

    settings_dirs = [d for d in (args.adapter, args.model_name_or_path) if d]
    try:
        family = detect_family(args.model_name_or_path)  # an unsupported model fails before anything loads
        processor = AutoProcessor.from_pretrained(processor_dir(args.adapter, args.model_name_or_path))
        settings = resolve_image_settings(processor, settings_dirs, args.max_image_side, family)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=args.dtype)
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
    model.to(state.device).eval()

    if state.is_main_process:
        print(f"{len(rows)} test samples, {state.num_processes} process(es) on {state.device}, {settings}")
    # Whole batches go to each process, so every batch (and its padding) is the one a single process would run.
    batch_starts = range(0, len(rows), args.batch_size)
    with state.split_between_processes(list(batch_starts)) as starts:
        shard = rows[starts[0] : starts[-1] + args.batch_size] if starts else []
        shard_predictions = predict(
            model, processor, shard, settings, args.batch_size, args.max_new_tokens, state.is_local_main_process
        )
    predictions = gather_object(shard_predictions)  # in process order = in test-set order
    if not state.is_main_process:
        return

    records, metrics = evaluate(rows, true_boxes, predictions)
    os.makedirs(args.output_dir, exist_ok=True)
    picture_paths = save_pictures(records, args.output_dir, args.num_vis)
    write_jsonl_atomic(os.path.join(args.output_dir, "predictions.jsonl"), records)
    write_json_atomic(os.path.join(args.output_dir, "metrics.json"), metrics)
    model_name = os.path.basename(os.path.normpath(args.adapter or args.model_name_or_path))
    print_summary(model_name, metrics)
    print(f"predictions, metrics and pictures written to {args.output_dir}")
    if args.report_to == "swanlab":
        log_to_swanlab(args, model_name, metrics, picture_paths)


if __name__ == "__main__":
    main()
