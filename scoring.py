"""Scoring a grounding model on the converter's JSONL, shared by infer.py, the mean-box baseline,
the benchmark and compare_evals.py: generation in batches, true boxes, per-sample records,
metrics by IoU threshold and by box size, and the summary table.

Library code raises (FileNotFoundError, ValueError); the entry points decide whether to exit.
"""

import math
import os
import warnings

import torch
from tqdm import tqdm
from transformers import GenerationConfig

from answers import answer_kind, build_messages, parse_bbox, read_answer_box
from model_families import box_from_answer
from utils import box_ious, check_processor_kept_frame, load_image, to_model_frame

# The thresholds lmms-eval reports for RefCOCO; 0.75 is kept for metrics.json files written before.
IOU_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.75, 0.9)
# True-box area as a share of the image area. TextVQA's targets are words and signs: a 64x43 word on
# a 1024x681 photo is 0.4% of it, so "small" (< 1%) holds the text boxes; RefCOCO's people and
# objects are mostly "medium" (1-10%) and "large" (>= 10%).
SIZE_BUCKETS = {"small": (0.0, 0.01), "medium": (0.01, 0.1), "large": (0.1, math.inf)}
# The demo's split by side instead of area (it draws targets by side): the true box's longer side under
# this share of the image's short side, or not (TextVQA's text boxes are about a tenth: 64x43 px in a
# 1024x681 image). Named by its cut, never "small", so it cannot be read as SIZE_BUCKETS' small.
TARGET_SIDE_CUT = 0.15
SIDE_BUCKETS = (f"side < {TARGET_SIDE_CUT:.0%}", f"side >= {TARGET_SIDE_CUT:.0%}")


def plain_greedy(checkpoint_config: GenerationConfig) -> GenerationConfig:
    """Greedy decoding with nothing else from the checkpoint but its special tokens: no repetition
    penalty, no sampling, no beams (generate fills unset values from model.generation_config, so the
    checkpoint's config is replaced rather than overridden)."""
    tokens = ("bos_token_id", "eos_token_id", "pad_token_id")
    return GenerationConfig(do_sample=False, num_beams=1, **{name: getattr(checkpoint_config, name) for name in tokens})


@torch.no_grad()
def predict(model, processor, rows, settings, batch_size, max_new_tokens, show_progress=True) -> list[dict]:
    """Generation in batches with the model's generation_config (infer.py and training make it plain_greedy).

    Returns per row {"raw_output", "pred_bbox" (original pixels), "image_size", "error"}. An image
    that cannot be decoded is left out of its batch, warned about and returned with its reason in
    "error", so one bad file does not stop a long evaluation.
    """
    processor.tokenizer.padding_side = "left"  # generation continues from the last position of every row
    predictions = []
    for start in tqdm(range(0, len(rows), batch_size), desc="generating", disable=not show_progress):
        batch_results, batch, originals, images = [], [], [], []
        for row in rows[start : start + batch_size]:
            try:
                original = load_image(row["image"][0])
                image = to_model_frame(original, settings)
            except ValueError as error:
                warnings.warn(f"sample left out of the scores: {error}")
                batch_results.append({"raw_output": None, "pred_bbox": None, "image_size": None, "error": str(error)})
                continue
            batch_results.append(None)  # filled below, in order
            batch.append(row)
            originals.append(original)
            images.append(image)
        answered = iter(generate_boxes(model, processor, batch, images, originals, settings, max_new_tokens))
        predictions.extend(result or next(answered) for result in batch_results)
    return predictions


def generate_boxes(model, processor, batch, images, originals, settings, max_new_tokens) -> list[dict]:
    """One generate call for the readable samples of a batch; boxes mapped from the model frame to original pixels."""
    if not batch:
        return []
    # Each row is asked as it was trained: a text question (general VQA) without the box instruction.
    messages = [build_messages(row["user"], answer_kind(row["assistant"])) for row in batch]
    prompts = [processor.apply_chat_template(message, add_generation_prompt=True) for message in messages]
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt").to(model.device)
    for row, image, image_grid_thw in zip(batch, images, inputs["image_grid_thw"].tolist()):
        check_processor_kept_frame(row["image"][0], image.size, image_grid_thw, settings.patch_size)
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens)
    texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    results = []
    for text, image, original in zip(texts, images, originals):
        box = parse_bbox(text)
        box = None if box is None else box_from_answer(box, settings.coordinate_system, image.size, original.size)
        results.append({"raw_output": text, "pred_bbox": box, "image_size": list(original.size), "error": None})
    return results


def read_true_boxes(path, rows) -> list[list[float]]:
    """Every row's true box (original pixels). A missing image raises FileNotFoundError and a bad
    answer ValueError, both naming the sample, so a wrong test set fails before any model loads."""
    true_boxes = []
    for number, row in enumerate(rows, start=1):
        where = f"{path}: sample {number} ({row['image'][0]})"
        if not os.path.isfile(row["image"][0]):
            raise FileNotFoundError(f"{where}: image not found")
        try:
            true_boxes.append(read_answer_box(row["assistant"]))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error
    return true_boxes


def size_bucket(box, image_size) -> str:
    x1, y1, x2, y2 = box
    share = (x2 - x1) * (y2 - y1) / (image_size[0] * image_size[1])
    return next(name for name, (low, high) in SIZE_BUCKETS.items() if low <= share < high)


def centre_inside(predicted, true) -> bool:
    """The predicted box's centre lies in the true box (a missing or inverted prediction misses)."""
    if predicted is None or predicted[2] <= predicted[0] or predicted[3] <= predicted[1]:
        return False
    centre_x, centre_y = (predicted[0] + predicted[2]) / 2, (predicted[1] + predicted[3]) / 2
    return true[0] <= centre_x <= true[2] and true[1] <= centre_y <= true[3]


def summarise(records) -> dict:
    """Count, mean IoU, Acc@IoU per threshold and centre accuracy of scored records (None if there are none)."""
    count = len(records)
    ious = [record["iou"] for record in records]
    hits = [centre_inside(record["pred_bbox"], record["gt_bbox"]) for record in records]

    def share(values):
        return sum(values) / count if count else None

    return {
        "count": count,
        "mean_iou": share(ious),
        **{f"acc@{threshold}": share([iou >= threshold for iou in ious]) for threshold in IOU_THRESHOLDS},
        "centre_acc": share(hits),
    }


def acc_by_target_side(records) -> dict[str, tuple[float | None, int]]:
    """Acc@0.5 and count of the scored predictions.jsonl records in each of SIDE_BUCKETS: true box's longer
    side under TARGET_SIDE_CUT of the image's short side, then the others."""
    under, rest = [], []
    for record in records:
        if record["error"] is None:  # a failed image is left out of every score
            x1, y1, x2, y2 = record["gt_bbox"]
            (under if max(x2 - x1, y2 - y1) < TARGET_SIDE_CUT * min(record["image_size"]) else rest).append(record)
    return {name: (summarise(bucket)["acc@0.5"], len(bucket)) for name, bucket in zip(SIDE_BUCKETS, (under, rest))}


def evaluate(rows, true_boxes, predictions) -> tuple[list[dict], dict]:
    """Per-sample records for predictions.jsonl and the metrics. An unparsed answer scores IoU 0; a
    sample whose image failed ("error") is kept in the records but left out of every denominator."""
    records = [
        {
            "image": row["image"][0],
            "query": row["user"],
            "gt_bbox": true_box,
            "pred_bbox": prediction["pred_bbox"],
            "iou": None,
            "raw_output": prediction["raw_output"],
            "image_size": prediction["image_size"],
            "error": prediction["error"],
        }
        for row, true_box, prediction in zip(rows, true_boxes, predictions)
    ]
    scored = [record for record in records if record["error"] is None]
    ious = box_ious([record["pred_bbox"] for record in scored], [record["gt_bbox"] for record in scored])
    for record, iou in zip(scored, ious):
        record["iou"] = iou
    overall = summarise(scored)
    metrics = {
        "num_samples": overall.pop("count"),
        **overall,
        "parse_failures": sum(record["pred_bbox"] is None for record in scored),
        "failed_samples": len(records) - len(scored),
        "by_size": {
            name: summarise([r for r in scored if size_bucket(r["gt_bbox"], r["image_size"]) == name])
            for name in SIZE_BUCKETS
        },
        "size_buckets": {
            name: f"{low:g} <= box area / image area < {high:g}" for name, (low, high) in SIZE_BUCKETS.items()
        },
    }
    return records, metrics


def format_value(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary_table(model_name, metrics) -> str:
    """One markdown row of the headline figures, with the small/medium/large Acc@0.5 and their counts."""
    sizes = metrics["by_size"]
    header = "| model | samples | failed | parse failures | acc@0.5 | acc@0.75 | mean IoU | centre acc |"
    header += "".join(f" {name} acc@0.5 (n) |" for name in sizes)
    row = (
        f"| {model_name} | {metrics['num_samples']} | {metrics['failed_samples']} | {metrics['parse_failures']} "
        f"| {format_value(metrics['acc@0.5'])} | {format_value(metrics['acc@0.75'])} "
        f"| {format_value(metrics['mean_iou'])} | {format_value(metrics['centre_acc'])} |"
    )
    row += "".join(f" {format_value(size['acc@0.5'])} ({size['count']}) |" for size in sizes.values())
    legend = "sizes by true-box area / image area: " + ", ".join(
        f"{name} [{low:g}, {high:g})" for name, (low, high) in SIZE_BUCKETS.items()
    )
    return "\n".join([header, "|---" * header.count(" |") + "|", row, legend])
