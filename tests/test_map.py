"""mAP with the model's confidences and with constant scores (scoring.detection_map), against a hand-worked case
and against pycocotools' COCOeval called directly."""

import contextlib
import io
import random

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from scoring import detection_map


def test_confidence_ranks_the_right_box_first():
    """Two true boxes; the model finds one (confidence 0.9) and misses the other with a wrong box (0.1).
    Ranked by confidence, precision is 1 up to recall 0.5: AP50 = 51/101 (COCO's 101 recall points). With
    every score 1 the tie keeps sample order, the wrong box first: precision 0.5 up to recall 0.5."""
    samples = [
        ([[0, 0, 10, 10]], [[50, 50, 60, 60]], [0.1]),
        ([[20, 20, 40, 40]], [[20, 20, 40, 40]], [0.9]),
    ]
    metrics = detection_map(samples)
    assert metrics["map_50"] == pytest.approx(51 / 101)
    assert metrics["map_50_const"] == pytest.approx(0.5 * 51 / 101)
    assert metrics["map"] == pytest.approx(51 / 101)  # the found box is exact: every IoU threshold passes


def test_an_inverted_prediction_is_a_false_positive():
    """x2 < x1 is no box: it matches nothing, and ranked above the right box it halves the precision up to
    the recall (0.5) the right box reaches."""
    samples = [([[0, 0, 10, 10]], [[10, 0, 0, 10]], [0.9]), ([[20, 20, 40, 40]], [[20, 20, 40, 40]], [0.5])]
    assert detection_map(samples)["map_50"] == pytest.approx(0.5 * 51 / 101)


def test_no_true_box_at_all_has_no_map():
    assert detection_map([([], [[0, 0, 5, 5]], [0.5])])["map"] is None


def coco_eval_stats(samples, constant):
    """mAP, AP50, AP75 from pycocotools directly: one image and one category per sample, boxes as xywh."""
    images = [{"id": index + 1} for index in range(len(samples))]
    annotations, detections = [], []
    for image_id, (true_boxes, predicted_boxes, confidences) in enumerate(samples, start=1):
        for x1, y1, x2, y2 in true_boxes:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                 "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            )  # fmt: skip
        for (x1, y1, x2, y2), confidence in zip(predicted_boxes, confidences):
            score = 1.0 if constant else confidence
            detections.append({"image_id": image_id, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1}]}
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats[:3]


def test_equals_pycocotools_on_random_samples():
    rng = random.Random(0)

    def jitter(box, amount):  # still a box (x1 < x2, y1 < y2): COCOeval has no rule for inverted ones
        x1, y1, x2, y2 = (v + rng.uniform(-amount, amount) for v in box)
        return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]

    samples = []
    for _ in range(40):
        true_boxes = []
        for _ in range(rng.choice([0, 1, 1, 2, 4])):
            x, y = rng.uniform(0, 300), rng.uniform(0, 300)
            true_boxes.append([x, y, x + rng.uniform(8, 120), y + rng.uniform(8, 120)])
        predicted_boxes = [jitter(box, rng.choice([1, 5, 30])) for box in true_boxes if rng.random() < 0.8]
        predicted_boxes += [jitter([100, 100, 150, 150], 50) for _ in range(rng.choice([0, 0, 1]))]
        samples.append((true_boxes, predicted_boxes, [rng.random() for _ in predicted_boxes]))
    metrics = detection_map(samples)
    for constant, suffix in ((False, ""), (True, "_const")):
        expected = coco_eval_stats(samples, constant)
        got = [metrics[f"map{suffix}"], metrics[f"map_50{suffix}"], metrics[f"map_75{suffix}"]]
        assert got == pytest.approx(list(expected), abs=1e-6)
    assert metrics["map"] != pytest.approx(metrics["map_const"])
