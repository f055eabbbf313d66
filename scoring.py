"""Scoring a grounding model on the converter's JSONL, shared by infer.py, the mean-box baseline,
the benchmark and compare_evals.py: true boxes, per-sample records, metrics by IoU threshold and by
box size, list rows' one-to-one matches, COCO mAP with the model's confidences, and the summary tables.
Predictions come from generation.py (or a backend of backends.py).

Library code raises (FileNotFoundError, ValueError); the entry points decide whether to exit.
"""

import math
import os

import torch
from torchmetrics.detection import MeanAveragePrecision

from answers import BOXES, answer_kind, read_answer_box, read_answer_boxes
from matching import duplicate_count, match_boxes
from utils import box_ious

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
        "parse_failures": sum(record["pred_bbox"] is None and not record["abstained"] for record in scored),
        "abstentions": sum(record["abstained"] for record in scored),
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
    metrics.update(detection_map([detection_sample(record) for record in records if record["error"] is None]))
    return records, metrics


def box_record(row, true_box, prediction) -> dict:
    return {
        "image": row["image"][0],
        "query": row["user"],
        "gt_bbox": true_box,
        "pred_bbox": prediction["pred_bbox"],
        "confidence": prediction.get("confidence"),
        "abstained": prediction.get("abstained", False),
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
    tables.append(
        f"mAP@[.5:.95] {format_value(metrics['map'])} (every score 1: {format_value(metrics['map_const'])}), "
        f"AP50 {format_value(metrics['map_50'])} ({format_value(metrics['map_50_const'])}), "
        f"AP75 {format_value(metrics['map_75'])} ({format_value(metrics['map_75_const'])}): boxes ranked by confidence"
    )
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


def detection_sample(record) -> tuple[list, list, list]:
    """A scored record as (true boxes, predicted boxes, confidences) for detection_map: a single-box row is
    one true box and at most one prediction."""
    if "gt_bbox" in record:
        predicted = [] if record["pred_bbox"] is None else [record["pred_bbox"]]
        return [record["gt_bbox"]], predicted, [record["confidence"]] * len(predicted)
    objects = record["pred_boxes"]
    return boxes_of(record["gt_boxes"]), boxes_of(objects), [item.get("confidence") for item in objects]


def detection_map(samples) -> dict:
    """COCO mAP@[.5:.95], AP50 and AP75 (torchmetrics MeanAveragePrecision, pycocotools backend: the
    reference implementation) over samples given as (true boxes, predicted boxes, confidences), each
    sample one image and the query its one class; twice: with the confidences, and with every score set
    to 1, as evaluations of text-answering models usually report it ("_const")."""
    metrics = {f"{key}{suffix}": None for suffix in ("", "_const") for key in ("map", "map_50", "map_75")}
    have_confidences = all(None not in confidences for _, _, confidences in samples)
    for suffix, constant in (("", False), ("_const", True)):
        if not samples or not (constant or have_confidences):  # without token probabilities: constant scores only
            continue
        # Every sample is already here (infer.py scores on its main process): no gathering across processes.
        mean_ap = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools", sync_on_compute=False)
        for true_boxes, predicted_boxes, confidences in samples:
            scores = [1.0] * len(predicted_boxes) if constant else confidences
            mean_ap.update(
                [{"boxes": _box_tensor(predicted_boxes), "scores": torch.tensor(scores), "labels": _one_class(predicted_boxes)}],
                [{"boxes": _box_tensor(true_boxes), "labels": _one_class(true_boxes)}],
            )
        result = mean_ap.compute()
        # -1 is pycocotools' "no true box at all": no mAP to report.
        for key in ("map", "map_50", "map_75"):
            metrics[key + suffix] = float(result[key]) if float(result[key]) >= 0 else None
    return metrics


def _box_tensor(boxes) -> torch.Tensor:
    """xyxy boxes; an inverted prediction becomes a box of zero area, which matches nothing but still counts."""
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2])], dim=1)


def _one_class(boxes) -> torch.Tensor:
    return torch.zeros(len(boxes), dtype=torch.long)


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
