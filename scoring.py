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

from answers import BOX, BOXES, answer_kind, build_messages, parse_bbox, parse_boxes, read_answer_box, read_answer_boxes
from matching import duplicate_count, match_boxes
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
    prompts = [
        processor.apply_chat_template(build_messages(row["user"], answer_kind(row["assistant"])), add_generation_prompt=True)
        for row in batch
    ]
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt").to(model.device)
    for row, image, image_grid_thw in zip(batch, images, inputs["image_grid_thw"].tolist()):
        check_processor_kept_frame(row["image"][0], image.size, image_grid_thw, settings.patch_size)
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens)
    texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [
        prediction_from_answer(text, answer_kind(row["assistant"]), image.size, original.size, settings)
        for text, row, image, original in zip(texts, batch, images, originals)
    ]


def prediction_from_answer(text, kind, model_size, original_size, settings) -> dict:
    """One raw answer as a prediction record, its boxes mapped from the model frame to original pixels:
    {"raw_output", "pred_bbox", "image_size", "error"} for a single-box row (the first box found, or None);
    for a list row "pred_boxes" ([{"bbox_2d", "label"}], duplicates kept) and "well_formed" (parse_boxes)
    instead of "pred_bbox". Every generation path (HF generate, a server) ends here."""
    record = {"raw_output": text, "image_size": list(original_size), "error": None}
    if kind == BOXES:
        objects, well_formed = parse_boxes(text)
        objects = [
            {**item, "bbox_2d": box_from_answer(item["bbox_2d"], settings.coordinate_system, model_size, original_size)}
            for item in objects
        ]
        return {**record, "pred_boxes": objects, "well_formed": well_formed}
    box = parse_bbox(text)
    box = None if box is None else box_from_answer(box, settings.coordinate_system, model_size, original_size)
    return {**record, "pred_bbox": box}


def read_true_boxes(path, rows) -> list:
    """Every row's truth in original pixels: a box for a single-box row, a list of {"bbox_2d", "label"} objects
    for a list row ([] for "none"). A missing image raises FileNotFoundError and a bad answer ValueError,
    both naming the sample, so a wrong test set fails before any model loads."""
    true_boxes = []
    for number, row in enumerate(rows, start=1):
        where = f"{path}: sample {number} ({row['image'][0]})"
        if not os.path.isfile(row["image"][0]):
            raise FileNotFoundError(f"{where}: image not found")
        try:
            read = read_answer_boxes if answer_kind(row["assistant"]) == BOXES else read_answer_box
            true_boxes.append(read(row["assistant"]))
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
    """Per-sample records for predictions.jsonl and the metrics. Single-box rows give the Acc@IoU metrics (an
    unparsed answer scores IoU 0); list rows, when the test set has any, add list_metrics' keys. A sample
    whose image failed ("error") is kept in the records but left out of every denominator."""
    records = [
        (list_record if is_object_list(truth) else box_record)(row, truth, prediction)
        for row, truth, prediction in zip(rows, true_boxes, predictions)
    ]
    box_records = [record for record in records if "gt_bbox" in record]
    scored = [record for record in box_records if record["error"] is None]
    ious = box_ious([record["pred_bbox"] for record in scored], [record["gt_bbox"] for record in scored])
    for record, iou in zip(scored, ious):
        record["iou"] = iou
    overall = summarise(scored)
    metrics = {
        "num_samples": overall.pop("count"),
        **overall,
        "parse_failures": sum(record["pred_bbox"] is None for record in scored),
        "failed_samples": sum(record["error"] is not None for record in records),
        "by_size": {
            name: summarise([r for r in scored if size_bucket(r["gt_bbox"], r["image_size"]) == name])
            for name in SIZE_BUCKETS
        },
        "size_buckets": {
            name: f"{low:g} <= box area / image area < {high:g}" for name, (low, high) in SIZE_BUCKETS.items()
        },
    }
    if len(box_records) < len(records):
        metrics.update(list_metrics([record for record in records if "gt_boxes" in record]))
    return records, metrics


def box_record(row, true_box, prediction) -> dict:
    return {
        "image": row["image"][0],
        "query": row["user"],
        "gt_bbox": true_box,
        "pred_bbox": prediction["pred_bbox"],
        "iou": None,
        "raw_output": prediction["raw_output"],
        "image_size": prediction["image_size"],
        "error": prediction["error"],
    }


# ---------------------------------------------------------------- list rows
# The IoU a list row's pairs are matched at in predictions.jsonl's "matches", the pictures and the splits.
MATCH_IOU = 0.5
LIST_THRESHOLDS = (0.5, 0.75)
COUNT_BUCKETS = {"0": (0, 0), "1": (1, 1), "2-3": (2, 3), "4+": (4, math.inf)}  # by number of true objects


def is_object_list(truth) -> bool:
    """A list row's truth ([{"bbox_2d", "label"}, ...], or [] for none), not a single box's 4 numbers."""
    return all(isinstance(item, dict) for item in truth)


def boxes_of(objects) -> list[list[float]]:
    return [item["bbox_2d"] for item in objects]


def list_record(row, true_objects, prediction) -> dict:
    """A list row's record: true and predicted objects in original pixels, and its (predicted index, true index,
    IoU) pairs matched at MATCH_IOU (None when its image failed)."""
    record = {
        "image": row["image"][0],
        "query": row["user"],
        "gt_boxes": true_objects,
        "pred_boxes": prediction.get("pred_boxes"),
        "matches": None,
        "well_formed": prediction.get("well_formed"),
        "raw_output": prediction["raw_output"],
        "image_size": prediction["image_size"],
        "error": prediction["error"],
    }
    if record["error"] is None:
        pairs = match_boxes(boxes_of(record["pred_boxes"]), boxes_of(true_objects), MATCH_IOU)
        record["matches"] = [list(pair) for pair in pairs]
    return record


def list_figures(samples) -> dict:
    """(predicted boxes, true boxes) per sample -> matches counted over all of them: precision (matched /
    predicted boxes), recall (matched / true boxes) and F1 (their harmonic mean, 2 matched / (predicted + true))
    at each of LIST_THRESHOLDS, and the mean IoU of the pairs matched at MATCH_IOU. None where a count is 0."""
    num_predicted = sum(len(predicted) for predicted, _ in samples)
    num_true = sum(len(true) for _, true in samples)
    figures = {"count": len(samples), "predicted_boxes": num_predicted, "true_boxes": num_true}
    for threshold in LIST_THRESHOLDS:
        matched = sum(len(match_boxes(predicted, true, threshold)) for predicted, true in samples)
        figures[f"precision@{threshold}"] = matched / num_predicted if num_predicted else None
        figures[f"recall@{threshold}"] = matched / num_true if num_true else None
        figures[f"f1@{threshold}"] = 2 * matched / (num_predicted + num_true) if num_predicted + num_true else None
    ious = [iou for predicted, true in samples for _, _, iou in match_boxes(predicted, true, MATCH_IOU)]
    figures["mean_matched_iou"] = sum(ious) / len(ious) if ious else None
    return figures


def list_metrics(records) -> dict:
    """The list rows' metrics: list_figures over the test set and by number of true objects (COUNT_BUCKETS);
    by box size (SIZE_BUCKETS) the recall of true boxes and precision of predicted boxes of that size, at
    MATCH_IOU; rejection accuracy (truth [] answered exactly []); duplicate rate (predicted boxes with IoU >=
    matching.DUPLICATE_IOU to an earlier one of the same answer / predicted boxes); malformed answers."""
    scored = [record for record in records if record["error"] is None]
    samples = [(boxes_of(record["pred_boxes"]), boxes_of(record["gt_boxes"])) for record in scored]
    overall = list_figures(samples)
    rejections = [record["well_formed"] and not record["pred_boxes"] for record in scored if not record["gt_boxes"]]
    duplicates = sum(duplicate_count(predicted) for predicted, _ in samples)
    return {
        "num_list_samples": overall.pop("count"),
        **overall,
        "rejection_acc": sum(rejections) / len(rejections) if rejections else None,
        "duplicate_rate": duplicates / overall["predicted_boxes"] if overall["predicted_boxes"] else None,
        "malformed_answers": sum(not record["well_formed"] for record in scored),
        "by_count": {
            name: list_figures([sample for sample in samples if low <= len(sample[1]) <= high])
            for name, (low, high) in COUNT_BUCKETS.items()
        },
        "list_by_size": list_by_size(scored),
    }


def list_by_size(records) -> dict:
    """For each of SIZE_BUCKETS: how many true boxes of that size and the share matched (recall), how many
    predicted boxes of that size and the share matched (precision), at MATCH_IOU."""
    counts = {name: {"true": [], "predicted": []} for name in SIZE_BUCKETS}
    for record in records:
        matched_true = {true_index for _, true_index, _ in record["matches"]}
        matched_predicted = {predicted_index for predicted_index, _, _ in record["matches"]}
        sides = (("true", record["gt_boxes"], matched_true), ("predicted", record["pred_boxes"], matched_predicted))
        for side, objects, matched in sides:
            for index, item in enumerate(objects):
                x1, y1, x2, y2 = item["bbox_2d"]
                box = [x1, y1, max(x1, x2), max(y1, y2)]  # an inverted prediction has no area: the smallest size
                counts[size_bucket(box, record["image_size"])][side].append(index in matched)

    def share(hits):
        return sum(hits) / len(hits) if hits else None

    return {
        name: {
            "true_boxes": len(hits["true"]),
            f"recall@{MATCH_IOU}": share(hits["true"]),
            "predicted_boxes": len(hits["predicted"]),
            f"precision@{MATCH_IOU}": share(hits["predicted"]),
        }
        for name, hits in counts.items()
    }


def format_value(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary_table(model_name, metrics) -> str:
    """Markdown rows of the headline figures: the single-box table (with the small/medium/large Acc@0.5 and
    their counts) unless the test set holds list rows only, then the list table when it holds any."""
    tables = []
    if metrics["num_samples"] or "num_list_samples" not in metrics:
        tables.append(box_summary_table(model_name, metrics))
    if "num_list_samples" in metrics:
        tables.append(list_summary_table(model_name, metrics))
    return "\n\n".join(tables)


def box_summary_table(model_name, metrics) -> str:
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


def list_summary_table(model_name, metrics) -> str:
    """One markdown row of the list rows' figures, with recall@0.5 (and true boxes) by number of true objects."""
    header = (
        "| model | list samples | failed | malformed | precision@0.5 | recall@0.5 | f1@0.5 | f1@0.75 "
        "| mean matched IoU | rejection acc | duplicate rate |"
    )
    by_count = {name: bucket for name, bucket in metrics["by_count"].items() if name != "0"}  # "0" has no true boxes
    header += "".join(f" {name} objects recall@0.5 (boxes) |" for name in by_count)
    figures = ("precision@0.5", "recall@0.5", "f1@0.5", "f1@0.75", "mean_matched_iou", "rejection_acc", "duplicate_rate")
    row = f"| {model_name} | {metrics['num_list_samples']} | {metrics['failed_samples']} | {metrics['malformed_answers']} |"
    row += "".join(f" {format_value(metrics[name])} |" for name in figures)
    row += "".join(f" {format_value(bucket['recall@0.5'])} ({bucket['true_boxes']}) |" for bucket in by_count.values())
    legend = f"list rows: boxes matched one-to-one (Hungarian on IoU); mean matched IoU over pairs at IoU >= {MATCH_IOU}"
    return "\n".join([header, "|---" * header.count(" |") + "|", row, legend])
