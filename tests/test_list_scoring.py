"""List rows (several boxes, or [] for none): the one-to-one matching against a brute force over every
assignment, the list metrics against counts worked out by hand, the prediction records of both families, the
pictures, and infer.py on list rows mixed with a single-box row, on images of different shapes."""

import itertools
import json
import random

import numpy as np
import pytest
from PIL import Image

import pictures
import scoring
from answers import BOXES, format_answer, format_boxes_answer
from conftest import run_infer, train
from matching import duplicate_count, match_boxes
from model_families import FAMILIES
from test_infer import independent_iou
from utils import ImageSettings, load_sft_jsonl

# Height 10 everywhere, so IoU is overlap / union of the x intervals. A overlaps T1 by 9/11 and T2 by 7/13; B
# overlaps T1 by 7/13 and T2 by 3/17. Greedy matching takes A-T1 (the best pair) and leaves B with 3/17: one
# match at 0.5. One-to-one Hungarian matching at 0.5 pairs A-T2 and B-T1: two matches. At 0.75 only A-T1 counts.
T1, T2 = [3, 0, 13, 10], [7, 0, 17, 10]
A, B = [4, 0, 14, 10], [0, 0, 10, 10]


def brute_force_best_sum(predicted, true, threshold):
    """The largest summed IoU of any one-to-one pairing whose pairs all reach the threshold (every injective
    map of a subset of the predictions to the true boxes)."""
    best = 0.0
    for size in range(min(len(predicted), len(true)) + 1):
        for chosen in itertools.permutations(range(len(true)), size):
            for predicted_indices in itertools.combinations(range(len(predicted)), size):
                ious = [independent_iou(predicted[i], true[j]) for i, j in zip(predicted_indices, chosen)]
                if all(iou >= threshold for iou in ious):
                    best = max(best, sum(ious))
    return best


def same_pairs(pairs, expected) -> bool:
    return sorted(map(tuple, pairs)) == [(i, j, pytest.approx(iou)) for i, j, iou in expected]


def test_hungarian_beats_greedy_on_a_hand_made_case():
    assert same_pairs(match_boxes([A, B], [T1, T2], 0.5), [(0, 1, 7 / 13), (1, 0, 7 / 13)])
    assert same_pairs(match_boxes([A, B], [T1, T2], 0.75), [(0, 0, 9 / 11)])
    assert match_boxes([A, A], [T1], 0.5) == [(0, 0, pytest.approx(9 / 11))]  # a box is matched once
    assert match_boxes([], [T1], 0.5) == [] and match_boxes([A], [], 0.5) == []
    assert match_boxes([[13, 0, 3, 10]], [T1], 0.0) == []  # inverted: overlaps nothing


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_matching_equals_a_brute_force_over_assignments(seed, threshold):
    generator = random.Random(seed)

    def box():
        x, y = generator.randint(0, 30), generator.randint(0, 30)
        return [x, y, x + generator.randint(4, 20), y + generator.randint(4, 20)]

    predicted = [box() for _ in range(generator.randint(0, 4))]
    true = [box() for _ in range(generator.randint(0, 4))]
    pairs = match_boxes(predicted, true, threshold)
    assert len({i for i, _, _ in pairs}) == len({j for _, j, _ in pairs}) == len(pairs)  # one-to-one
    assert all(iou == pytest.approx(independent_iou(predicted[i], true[j])) and iou >= threshold for i, j, iou in pairs)
    assert sum(iou for _, _, iou in pairs) == pytest.approx(brute_force_best_sum(predicted, true, threshold))


def test_duplicates_are_boxes_close_to_an_earlier_one():
    assert duplicate_count([A, A, B, [4, 0, 14, 11]]) == 2  # the second A, and A grown by 1 px (IoU 10/11)
    assert duplicate_count([T1, T2, A]) == 0 and duplicate_count([]) == 0


def assert_nested_approx(figures, expected):
    assert figures.keys() == expected.keys()
    for name in expected:
        assert figures[name] == pytest.approx(expected[name]), name


def objects(*boxes, label="shape"):
    return [{"bbox_2d": box, "label": label} for box in boxes]


def list_prediction(boxes, image_size, well_formed=True):
    return {"raw_output": "", "pred_boxes": objects(*boxes), "well_formed": well_formed, "image_size": image_size, "error": None}


def test_list_metrics_on_hand_made_samples():
    """Six list rows and one single-box row; every figure below is counted by hand."""
    square = [0, 0, 50, 50]  # 25% of a 100x100 image: large
    far = [[x, 0, x + 20, 20] for x in (0, 25, 50, 75)]  # 4% each: medium
    cases = [  # (truth, prediction)
        (objects(T1, T2), list_prediction([A, B], [200, 100])),  # 2 true: 2 matches at 0.5 (7/13 each), 1 at 0.75
        ([], list_prediction([], [100, 100])),  # rejected correctly
        ([], list_prediction([[0, 0, 5, 5]], [100, 100])),  # not rejected: 1 unmatched small box
        (objects(square), list_prediction([square, square], [100, 100])),  # 1 match (IoU 1) and 1 duplicate
        (objects(*far), list_prediction([], [100, 100], well_formed=False)),  # prose: malformed, 4 missed
        (objects(square), {"raw_output": None, "pred_bbox": None, "image_size": None, "error": "cannot read image"}),
        ([10, 10, 20, 20], {"raw_output": "", "pred_bbox": [10, 10, 20, 20], "image_size": [100, 100], "error": None}),
    ]
    rows = [{"image": [f"{index}.png"], "user": "find every shape"} for index in range(len(cases))]
    records, metrics = scoring.evaluate(rows, [truth for truth, _ in cases], [prediction for _, prediction in cases])

    # 5 predicted and 7 true boxes in the 5 scored list rows; 3 matches at 0.5, 2 at 0.75.
    expected = {
        "num_list_samples": 5, "predicted_boxes": 5, "true_boxes": 7,
        "precision@0.5": 3 / 5, "recall@0.5": 3 / 7, "f1@0.5": 2 * 3 / 12,
        "precision@0.75": 2 / 5, "recall@0.75": 2 / 7, "f1@0.75": 2 * 2 / 12,
        "mean_matched_iou": (7 / 13 + 7 / 13 + 1) / 3, "rejection_acc": 1 / 2, "duplicate_rate": 1 / 5,
        "malformed_answers": 1, "failed_samples": 1,
    }  # fmt: skip
    assert {key: metrics[key] for key in expected} == pytest.approx(expected)
    f1 = 2 * (3 / 5) * (3 / 7) / (3 / 5 + 3 / 7)  # the harmonic mean of precision and recall
    assert metrics["f1@0.5"] == pytest.approx(f1)
    by_count = {name: {key: figures[key] for key in ("count", "precision@0.5", "recall@0.5", "f1@0.5")}
                for name, figures in metrics["by_count"].items()}  # fmt: skip
    assert_nested_approx(by_count, {
        "0": {"count": 2, "precision@0.5": 0.0, "recall@0.5": None, "f1@0.5": 0.0},
        "1": {"count": 1, "precision@0.5": 1 / 2, "recall@0.5": 1.0, "f1@0.5": 2 / 3},
        "2-3": {"count": 1, "precision@0.5": 1.0, "recall@0.5": 1.0, "f1@0.5": 1.0},
        "4+": {"count": 1, "precision@0.5": None, "recall@0.5": 0.0, "f1@0.5": 0.0},
    })  # fmt: skip
    assert_nested_approx(metrics["list_by_size"], {
        "small": {"true_boxes": 2, "recall@0.5": 1.0, "predicted_boxes": 3, "precision@0.5": 2 / 3},  # T1, T2; A, B, tiny
        "medium": {"true_boxes": 4, "recall@0.5": 0.0, "predicted_boxes": 0, "precision@0.5": None},
        "large": {"true_boxes": 1, "recall@0.5": 1.0, "predicted_boxes": 2, "precision@0.5": 1 / 2},
    })  # fmt: skip

    # The single-box row keeps today's metrics, as if it were alone.
    alone = scoring.evaluate(rows[-1:], [cases[-1][0]], [cases[-1][1]])[1]
    assert "num_list_samples" not in alone and "precision@0.5" not in alone
    assert {key: metrics[key] for key in alone if key != "failed_samples"} == {k: v for k, v in alone.items() if k != "failed_samples"}
    assert same_pairs(records[0]["matches"], [(0, 1, 7 / 13), (1, 0, 7 / 13)])
    assert records[5]["matches"] is None and records[6]["iou"] == 1.0
    table = scoring.summary_table("m", metrics)
    assert "| m | 1 | 1 | 0 | 1.0000 |" in table  # the single-box row
    assert "| m | 5 | 1 | 1 | 0.6000 | 0.4286 | 0.5000 | 0.3333 |" in table


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_list_answer_boxes_are_mapped_back_to_original_pixels(processor, model_type):
    """The same original box answered in each family's coordinates comes back in original pixels."""
    family = FAMILIES[model_type]
    settings = ImageSettings.from_processor(processor, 112, family)
    original_size, model_size = (300, 150), (112, 56)  # the frame scales x by 112/300 and y by 56/150
    answers = {  # [30, 15, 150, 75] in original pixels: the model frame's pixels, or 0-1000 of it
        "qwen2_5_vl": '```json\n[{"bbox_2d": [11.2, 5.6, 56, 28], "label": "a"}, {"bbox_2d": [0, 0, 112, 56], "label": "b"}]\n```',
        "qwen3_vl": '[{"bbox_2d": [100, 100, 500, 500], "label": "a"}, {"bbox_2d": [0, 0, 1000, 1000], "label": "b"}]',
    }
    record = scoring.prediction_from_answer(answers[model_type], BOXES, model_size, original_size, settings)
    assert record["pred_boxes"] == [
        {"bbox_2d": pytest.approx([30, 15, 150, 75]), "label": "a"},
        {"bbox_2d": [0, 0, 300, 150], "label": "b"},
    ]
    assert record["well_formed"] and "pred_bbox" not in record
    cut = scoring.prediction_from_answer(answers[model_type][:60], BOXES, model_size, original_size, settings)
    assert len(cut["pred_boxes"]) == 1 and not cut["well_formed"]  # truncated: the finished box is kept
