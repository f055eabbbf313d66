"""List rows (several boxes, or [] for none): the one-to-one matching against a brute force over every
assignment, the list metrics against counts worked out by hand, the prediction records of both families, the
pictures, and infer.py on list rows mixed with a single-box row, on images of different shapes."""

import itertools
import json
import random
import subprocess

import numpy as np
import pytest
from PIL import Image

import generation
import pictures
import scoring
from answers import BOXES, format_answer, format_boxes_answer
from conftest import REPO_DIR, infer_command, run_script, train
from matching import duplicate_count, match_boxes
from model_families import FAMILIES
from test_grpo import grpo, step_records
from test_infer import independent_iou
from utils import ImageSettings, load_sft_jsonl

# Height 10 everywhere, so IoU is overlap / union of the x intervals. A overlaps T1 by 9/11 and T2 by 7/13; B
# overlaps T1 by 7/13 and T2 by 3/17. Greedy matching takes A-T1 (the best pair) and leaves B with 3/17: one
# match at 0.5. One-to-one Hungarian matching at 0.5 pairs A-T2 and B-T1: two matches. At 0.75 only A-T1 counts.
T1, T2 = [3, 0, 13, 10], [7, 0, 17, 10]
A, B = [4, 0, 14, 10], [0, 0, 10, 10]


def brute_force_best_pairs(predicted, true, threshold):
    """The one-to-one pairing with the largest summed IoU whose pairs all reach the threshold (and overlap),
    found by trying every injective map of a subset of the predictions to the true boxes: its IoUs."""
    best = []
    for size in range(min(len(predicted), len(true)) + 1):
        for chosen in itertools.permutations(range(len(true)), size):
            for predicted_indices in itertools.combinations(range(len(predicted)), size):
                ious = [independent_iou(predicted[i], true[j]) for i, j in zip(predicted_indices, chosen)]
                if all(iou >= threshold and iou > 0 for iou in ious) and sum(ious) > sum(best) + 1e-12:
                    best = ious
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
    assert sum(iou for _, _, iou in pairs) == pytest.approx(sum(brute_force_best_pairs(predicted, true, threshold)))


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

    # The single-box row keeps today's metrics, as if it were alone (mAP ranks the boxes of every row together).
    alone = scoring.evaluate(rows[-1:], [cases[-1][0]], [cases[-1][1]])[1]
    assert "num_list_samples" not in alone and "precision@0.5" not in alone
    own_keys = [key for key in alone if key != "failed_samples" and not key.startswith("map")]
    assert {key: metrics[key] for key in own_keys} == {key: alone[key] for key in own_keys}
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
    record = generation.prediction_from_answer(answers[model_type], BOXES, model_size, original_size, settings)
    assert record["pred_boxes"] == [
        {"bbox_2d": pytest.approx([30, 15, 150, 75]), "label": "a", "confidence": None},  # no token scores given
        {"bbox_2d": [0, 0, 300, 150], "label": "b", "confidence": None},
    ]
    assert record["well_formed"] and "pred_bbox" not in record
    cut = generation.prediction_from_answer(answers[model_type][:60], BOXES, model_size, original_size, settings)
    assert len(cut["pred_boxes"]) == 1 and not cut["well_formed"]  # truncated: the finished box is kept


# ---------------------------------------------------------------- through infer.py and grpo.py
# (width, height, [(colour, box in original pixels)]): wide, tall, square and very wide images.
SCENES = [
    (96, 64, [("red", [8, 8, 40, 40]), ("red", [56, 20, 88, 56]), ("blue", [44, 2, 54, 12])]),
    (64, 96, [("red", [10, 50, 50, 90]), ("blue", [4, 4, 30, 30])]),
    (80, 80, [("blue", [20, 20, 60, 60])]),
    (120, 48, [("red", [4, 4, 30, 40]), ("red", [44, 8, 70, 44]), ("red", [84, 4, 116, 30])]),
]


@pytest.fixture(scope="module")
def list_jsonl(tmp_path_factory):
    """A list row asking for every red shape of each SCENES image (2, 1, 0 and 3 of them), and a single-box row."""
    from PIL import ImageDraw

    directory = tmp_path_factory.mktemp("list_rows")
    lines = []
    for number, (width, height, shapes) in enumerate(SCENES):
        image = Image.new("RGB", (width, height), "white")
        for colour, box in shapes:
            ImageDraw.Draw(image).rectangle(box, fill=colour)
        image.save(directory / f"{number}.png")
        red = [{"bbox_2d": box, "label": "red shape"} for colour, box in shapes if colour == "red"]
        query = 'Locate every instance that belongs to the following categories: "red shape". Report bbox coordinates in JSON format.'
        lines.append({"image": [f"{number}.png"], "query": query, "response": format_boxes_answer(red)})
    blue = SCENES[2][2][0][1]
    lines.append({"image": ["2.png"], "query": "where is the blue square?", "response": format_answer(blue)})
    (directory / "rows.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory / "rows.jsonl"


def independent_list_metrics(records):
    """precision, recall, F1 at 0.5 and 0.75, rejection accuracy and malformed answers of predictions.jsonl's list
    records, with the brute-force matching and counting written out here."""
    scored = [record for record in records if "gt_boxes" in record and record["error"] is None]
    pairs = [([p["bbox_2d"] for p in r["pred_boxes"]], [t["bbox_2d"] for t in r["gt_boxes"]]) for r in scored]
    num_predicted, num_true = sum(len(p) for p, _ in pairs), sum(len(t) for _, t in pairs)
    figures = {"num_list_samples": len(scored), "predicted_boxes": num_predicted, "true_boxes": num_true}
    for threshold in (0.5, 0.75):
        matched = sum(len(brute_force_best_pairs(p, t, threshold)) for p, t in pairs)
        figures[f"precision@{threshold}"] = matched / num_predicted if num_predicted else None
        figures[f"recall@{threshold}"] = matched / num_true if num_true else None
        figures[f"f1@{threshold}"] = 2 * matched / (num_predicted + num_true)
    empty = [r for r in scored if not r["gt_boxes"]]
    figures["rejection_acc"] = sum(r["raw_output"].strip() == "[]" for r in empty) / len(empty)
    figures["malformed_answers"] = sum(not r["well_formed"] for r in scored)
    return figures


def infer_lists(model_dir, list_jsonl, output_dir):
    """infer.py with room for a list of three boxes (run_infer allows 24 tokens); its records and metrics."""
    command, env = infer_command("--model_name_or_path", model_dir, "--test_dataset_name", list_jsonl,
                                 "--num_vis", 5, output_dir=output_dir, batch_size=5)  # fmt: skip
    command[-1] = "160"  # --max_new_tokens
    result = subprocess.run(command, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    records = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    return result, records, json.loads((output_dir / "metrics.json").read_text())


def check_list_run(result, records, metrics, list_jsonl, output_dir):
    rows = load_sft_jsonl(list_jsonl)
    assert [r.get("gt_boxes", r.get("gt_bbox")) for r in records] == scoring.read_true_boxes(str(list_jsonl), rows)
    list_keys = {"image", "query", "gt_boxes", "pred_boxes", "matches", "well_formed", "raw_output", "image_size", "error"}
    assert [set(r) == list_keys for r in records] == [True] * 4 + [False]  # the single-box row keeps its keys
    for record in records[:4]:  # every predicted box in original pixels, inside its image
        width, height = Image.open(record["image"]).size
        assert record["image_size"] == [width, height]
        for item in record["pred_boxes"]:
            x1, y1, x2, y2 = item["bbox_2d"]
            assert 0 <= x1 <= width and 0 <= x2 <= width and 0 <= y1 <= height and 0 <= y2 <= height, record
    expected = independent_list_metrics(records)
    assert {key: metrics[key] for key in expected} == pytest.approx(expected)
    assert metrics["num_samples"] == 1 and metrics["by_count"]["0"]["count"] == 1  # both kinds reported
    assert f"| {metrics['num_list_samples']} | 0 | {metrics['malformed_answers']} |" in result.stdout
    assert len(list((output_dir / "vis").iterdir())) == 6  # 5 pictures and the grid


@pytest.fixture(scope="module")
def list_model_dir(tiny_model_dir, list_jsonl, tmp_path_factory):
    """The tiny Qwen2.5-VL trained until it answers the list rows (memorised, to have boxes to score)."""
    output_dir = tmp_path_factory.mktemp("list_model") / "model"
    return train(tiny_model_dir, list_jsonl, output_dir, "--max_steps", 100, "--learning_rate", 5e-3,
                 "--lr_scheduler_type", "constant", "--per_device_train_batch_size", 5)  # fmt: skip


def test_infer_scores_list_rows_of_a_trained_model(list_model_dir, list_jsonl, tmp_path):
    result, records, metrics = infer_lists(list_model_dir, list_jsonl, tmp_path)
    check_list_run(result, records, metrics, list_jsonl, tmp_path)
    assert metrics["f1@0.5"] > 0, [r["raw_output"] for r in records]


def test_infer_scores_list_rows_of_an_untrained_qwen3_vl(tiny_qwen3_vl_dir, list_jsonl, tmp_path):
    result, records, metrics = infer_lists(tiny_qwen3_vl_dir, list_jsonl, tmp_path)
    check_list_run(result, records, metrics, list_jsonl, tmp_path)


def test_picture_of_a_list_row_tells_matched_from_missed_and_labels_predictions(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (400, 300), (128, 128, 128)).save(path)
    record = {
        "image": str(path), "query": "every square", "gt_boxes": objects([50, 60, 150, 200], [250, 60, 350, 200]),
        "pred_boxes": [{"bbox_2d": [70, 80, 130, 180], "label": "square"}], "matches": [[0, 0, 0.9]], "well_formed": True,
    }  # fmt: skip

    def extent(picture, color):
        ys, xs = np.nonzero((np.asarray(picture)[:300] == color).all(axis=2))
        return (xs.min(), ys.min(), xs.max(), ys.max()) if len(xs) else None

    picture = pictures.draw_prediction(record)
    # Each drawn around its box (within the picture's margin and line width), in its own colour.
    assert np.allclose(extent(picture, pictures.TRUE_COLOR), (50, 60, 150, 200), atol=5)  # the matched true box
    assert np.allclose(extent(picture, pictures.MISSED_COLOR), (250, 60, 350, 200), atol=5)  # the missed one
    assert np.allclose(extent(picture, pictures.PREDICTED_COLOR), (70, 80, 130, 180), atol=5)
    unlabelled = pictures.draw_prediction({**record, "pred_boxes": [{**record["pred_boxes"][0], "label": ""}]})
    changed_ys, changed_xs = np.nonzero((np.asarray(picture) != np.asarray(unlabelled)).any(axis=2))
    assert len(changed_xs) and 70 < changed_xs.min() and changed_xs.max() < 130 and 80 < changed_ys.min()  # inside the box
    both_found = pictures.draw_prediction({**record, "matches": [[0, 0, 0.9], [1, 1, 0.8]]})
    assert extent(both_found, pictures.MISSED_COLOR) is None


def test_grpo_refuses_rewards_that_score_no_list_row(tiny_model_dir, list_jsonl, tmp_path):
    """The default rewards score single boxes only: a set with list rows is refused before the model loads."""
    refused = run_script("grpo.py", "--config", "configs/demo_grpo_tiny_cpu.yaml", "--model_name_or_path", tiny_model_dir,
                         "--train_dataset_name", list_jsonl, "--output_dir", tmp_path / "refused", check=False)  # fmt: skip
    assert refused.returncode != 0 and "boxes rows that none of reward_funcs ['iou', 'format'] scores" in refused.stderr
    assert "Loading weights" not in refused.stderr


@pytest.mark.parametrize("family_fixture", ["tiny_model_dir", "tiny_qwen3_vl_dir"])
def test_grpo_trains_list_rows_beside_a_single_box_row(family_fixture, list_jsonl, request, tmp_path):
    """Two steps on the list rows and the single-box row, each scored by its own rewards, for both families."""
    model_dir = request.getfixturevalue(family_fixture)
    grpo("--model_name_or_path", model_dir, "--train_dataset_name", list_jsonl, "--max_image_side", 56,
         "--output_dir", tmp_path / "lists", "--reward_funcs", "list_iou", "list_format", "iou",
         "--reward_weights", 1.0, 0.5, 1.0, "--max_completion_length", 16, "--max_steps", 2, "--save_strategy", "no")  # fmt: skip
    records = step_records(tmp_path / "cpu_lists")
    assert [entry["step"] for entry in records] == [1, 2]
    assert all("rewards/list_iou_reward/mean" in entry for entry in records), records


def test_compare_evals_shows_list_figures_where_a_test_set_has_list_rows(tmp_path):
    box = {"acc@0.5": 0.5, "mean_iou": 0.4, "by_size": {"small": {"acc@0.5": None, "count": 0}}}
    lists = {**box, "num_list_samples": 3, "f1@0.5": 0.6, "recall@0.5": 0.5, "rejection_acc": 1.0}
    for name, model, test_set, metrics in [("a", "single", "boxes.jsonl", box), ("b", "single", "lists.jsonl", lists),
                                           ("c", "detect", "lists.jsonl", {**lists, "f1@0.5": 0.7})]:  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"model": model, "test_dataset": test_set, **metrics}))
    result = run_script("scripts/compare_evals.py", *(tmp_path / name for name in "abc"), "--output", tmp_path / "t.md")
    header, _, first, second = result.stdout.splitlines()[:4]
    assert "boxes.jsonl mAP scores 1 | lists.jsonl Acc@0.5" in header and "boxes.jsonl F1@0.5" not in header
    assert header.endswith("| lists.jsonl rejection acc | lists.jsonl mAP | lists.jsonl mAP scores 1 |")
    # metrics.json files from before mAP have none: "n/a".
    assert first.endswith("| 0.6000 | 0.5000 | 1.0000 | n/a | n/a |")
    assert second.endswith("| 0.7000 (+0.1000) | 0.5000 (+0.0000) | 1.0000 (+0.0000) | n/a | n/a |")
