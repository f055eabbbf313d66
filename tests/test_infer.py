"""infer.py and scoring.py: the parser, the mapping back to original pixels, and the CLI on tiny
models trained by sft.py (full and LoRA), merged by scripts/merge_model.py, on one process and on
two, with a corrupt image in the test set, metrics recomputed here independently."""

import dataclasses
import glob
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

import infer
import pictures
import scoring
from answers import format_answer, parse_bbox, read_answer_box
from conftest import ACCELERATE_2, CORRUPT_LINE, assert_same_predictions, run_infer, run_script, train_lora
from model_families import FAMILIES
from utils import ImageSettings, load_sft_jsonl
from vqa_accuracy import vqa_accuracy

# What models really emit: the trained format, Qwen2.5-VL's zero-shot habits, Qwen2-VL's point
# pairs, truncated generations, and text with no box at all.
PARSER_TABLE = [
    ('{"bbox_2d": [12, 34, 56, 78]}', [12, 34, 56, 78]),
    ('{"bbox_2d": [12.5, 34, 56, 78.25]}', [12.5, 34, 56, 78.25]),
    ('{"bbox_2d": [-3, 5, 40, 60]}', [-3, 5, 40, 60]),  # out of the image: kept, clipped later
    ('```json\n[\n\t{"bbox_2d": [12, 34, 56, 78], "label": "the sign"}\n]\n```', [12, 34, 56, 78]),
    ('The sign is at {"bbox_2d": [1, 2, 3, 4]}.', [1, 2, 3, 4]),
    ('[{"label": "cup"}, {"bbox_2d": [5, 6, 7, 8], "label": "sign"}]', [5, 6, 7, 8]),
    ('[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]', [1, 2, 3, 4]),  # several: the first
    ('See [9, 9, 9, 9]? No: {"bbox_2d": [1, 2, 3, 4]}', [1, 2, 3, 4]),  # the trained key wins
    ('{"bbox_2d": [12, 34, 56, 78]}"}', [12, 34, 56, 78]),  # junk after the JSON
    ('[{"bbox_2d": [1, 2, 3, 4], "label": "the na', [1, 2, 3, 4]),  # cut off by max_new_tokens
    ("{'bbox_2d': [1, 2, 3, 4]}", [1, 2, 3, 4]),  # Python dict, not JSON
    # Qwen3-VL's zero-shot answers (0-1000), from Qwen's cookbooks (QwenLM/Qwen3-VL, cookbooks/omni_recognition.ipynb
    # and think_with_images.ipynb): a fenced list with tabs and extra keys; the model's own broken list (an
    # object opened twice); a tool call with text around it.
    (
        '```json\n[\n\t{"bbox_2d": [0, 614, 224, 825], "name_zh": "米饭", "name_en": "Rice"},\n'
        '\t{"bbox_2d": [266, 126, 695, 343], "name_zh": "土豆胡萝卜排骨汤", "name_en": "Potato Carrot Pork Rib Soup"}\n]\n```',
        [0, 614, 224, 825],
    ),
    (
        '```json\n[\n\t{\n\t{"bbox_2d": [649, 116, 794, 643],\n\t\t"names": {\n\t\t\t"zh": "伊黑小芭内",\n'
        '\t\t\t"en": "Obanai Iguro"\n\t\t}\n\t},\n\t{\n\t\t"bbox_2d": [762, 34, 999, 555],',
        [649, 116, 794, 643],
    ),
    (
        "I will zoom in on the main bear character.\n\n\n[TOOL_CALL] image_zoom_in_tool\n"
        '{"label": "central bear logo", "bbox_2d": [395, 276, 618, 740], "img_idx": 0}',
        [395, 276, 618, 740],
    ),
    ("[12, 34, 56, 78]", [12, 34, 56, 78]),
    ("[\n  12,\n  34,\n  56,\n  78\n]", [12, 34, 56, 78]),
    ("[[10, 20, 30, 40]]", [10, 20, 30, 40]),
    ("The box is [x1,y1,x2,y2] = [10, 20, 30, 40].", [10, 20, 30, 40]),
    ('{"bbox": [1, 2, 3, 4]}', [1, 2, 3, 4]),  # another key: the bare-list fallback
    ("<|box_start|>(10,20),(30,40)<|box_end|>", [10, 20, 30, 40]),  # Qwen2-VL
    ("(10, 20), (30.5, 40)", [10, 20, 30.5, 40]),  # the same with its tags skipped in decoding
    ("", None),
    ("I cannot find it in the image.", None),
    ('{"bbox_2d": [1, 2, 3]}', None),
    ("[1, 2, 3, 4, 5]", None),
    ('{"bbox_2d": ["1", "2", "3", "4"]}', [1, 2, 3, 4]),  # quoted numbers
    ('{"bbox_2d": [" 1.5", "2", "3", "4"]}', [1.5, 2, 3, 4]),
    ('{"bbox_2d": ["1", "two", "3", "4"]}', None),
    ('{"bbox_2d": ["nan", "2", "3", "4"]}', None),
    ('{"bbox_2d": [true, 2, 3, 4]}', None),
    ("(10, 20)", None),
    ("x1=10, y1=20, x2=30, y2=40", None),
    ('{"bbox_2d": [', None),
    ("1 2 3 4", None),
]

QWEN2_5_VL = FAMILIES["qwen2_5_vl"]


@pytest.mark.parametrize("text, expected", PARSER_TABLE)
def test_parser_on_real_world_outputs(text, expected):
    assert parse_bbox(text) == expected


# ---------------------------------------------------------------- the CLI on trained models
@pytest.fixture(scope="module")
def answering_model_dir(answering_model):
    return answering_model("qwen2_5_vl")


def independent_iou(box_a, box_b):
    if box_a is None:
        return 0.0
    width = min(box_a[2], box_b[2]) - max(box_a[0], box_b[0])
    height = min(box_a[3], box_b[3]) - max(box_a[1], box_b[1])
    intersection = max(width, 0) * max(height, 0)
    area_a = (box_a[2] - box_a[0]) * (box_a[3] - box_a[1])
    area_b = (box_b[2] - box_b[0]) * (box_b[3] - box_b[1])
    return intersection / (area_a + area_b - intersection)


def independent_figures(samples):
    """(true box, predicted box, image path) -> the metrics' figures, computed without scoring.py."""
    ious = [independent_iou(predicted, true) for true, predicted, _ in samples]
    centres = [
        predicted is not None and true[0] <= (predicted[0] + predicted[2]) / 2 <= true[2]
        and true[1] <= (predicted[1] + predicted[3]) / 2 <= true[3]
        for true, predicted, _ in samples
    ]  # fmt: skip
    count = len(samples)
    figures = {"count": count, "mean_iou": sum(ious) / count if count else None}
    for threshold in (0.1, 0.3, 0.5, 0.7, 0.75, 0.9):
        figures[f"acc@{threshold}"] = sum(iou >= threshold for iou in ious) / count if count else None
    figures["centre_acc"] = sum(centres) / count if count else None
    return figures


def independent_metrics(predictions):
    scored = [(p["gt_bbox"], p["pred_bbox"], p["image"]) for p in predictions if p["error"] is None]
    overall = independent_figures(scored)
    by_size = {"small": [], "medium": [], "large": []}
    for true, predicted, image in scored:
        width, height = Image.open(image).size
        share = (true[2] - true[0]) * (true[3] - true[1]) / (width * height)
        by_size["small" if share < 0.01 else "medium" if share < 0.1 else "large"].append((true, predicted, image))
    return {
        "num_samples": overall.pop("count"), **overall,
        "parse_failures": sum(predicted is None for _, predicted, _ in scored),
        "failed_samples": len(predictions) - len(scored),
        "by_size": {name: independent_figures(samples) for name, samples in by_size.items()},
    }  # fmt: skip


@pytest.fixture(scope="module")
def single_process_run(answering_model_dir, data_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("infer_single")
    test_set = ["--test_dataset_name", data_dir / "eval.jsonl", "--num_vis", 5]
    return output_dir, *run_infer("--model_name_or_path", answering_model_dir, *test_set, output_dir=output_dir)


def test_predictions_metrics_and_pictures(single_process_run, data_dir):
    output_dir, result, predictions, metrics = single_process_run
    rows = load_sft_jsonl(data_dir / "eval.jsonl")
    assert [(p["image"], p["query"]) for p in predictions] == [(row["image"][0], row["user"]) for row in rows]
    assert [p["gt_bbox"] for p in predictions] == [read_answer_box(row["assistant"]) for row in rows]
    keys = {"image", "query", "gt_bbox", "pred_bbox", "confidence", "abstained", "iou", "raw_output", "image_size", "error"}
    assert all(set(prediction) == keys for prediction in predictions)

    # The corrupt image: recorded with its reason, warned about by name, left out of every figure.
    corrupt = predictions.pop(CORRUPT_LINE)
    assert corrupt["image"].endswith("corrupt.jpg") and "cannot read image" in corrupt["error"]
    assert (corrupt["pred_bbox"], corrupt["iou"], corrupt["raw_output"]) == (None, None, None)
    assert f"{corrupt['image']} not scored" in result.stdout and corrupt["image"] in result.stderr
    for prediction in predictions:
        assert prediction["error"] is None and prediction["image_size"] == list(Image.open(prediction["image"]).size)
        if prediction["pred_bbox"] is not None:  # original pixels: inside the original image
            width, height = prediction["image_size"]
            x1, y1, x2, y2 = prediction["pred_bbox"]
            assert 0 <= x1 <= width and 0 <= x2 <= width and 0 <= y1 <= height and 0 <= y2 <= height
            assert 0 < prediction["confidence"] <= 1 and not prediction["abstained"]
        else:
            assert prediction["confidence"] is None
    parsed = [p for p in predictions if p["pred_bbox"] is not None]
    assert len(parsed) >= 4 and any(p["iou"] > 0.5 for p in parsed), [p["raw_output"] for p in predictions]

    ious = [independent_iou(p["pred_bbox"], p["gt_bbox"]) for p in predictions]
    assert [p["iou"] for p in predictions] == pytest.approx(ious, abs=1e-9)
    expected = independent_metrics([corrupt] + predictions)
    expected_by_size = expected.pop("by_size")
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, abs=1e-9)
    for name, figures in expected_by_size.items():
        assert metrics["by_size"][name] == pytest.approx(figures, abs=1e-9), name
    assert metrics["num_samples"] == 8 and metrics["failed_samples"] == 1
    assert sum(size["count"] for size in metrics["by_size"].values()) == 8
    summary = f"| 8 | 1 | {metrics['parse_failures']} | {metrics['acc@0.5']:.4f} | {metrics['acc@0.75']:.4f} |"
    assert summary in result.stdout
    assert not glob.glob(str(output_dir / "predictions.partial*"))  # removed once the final files exist

    vis_dir = output_dir / "vis"
    assert sorted(os.listdir(vis_dir)) == ["00000.jpg", "00001.jpg", "00002.jpg", "00003.jpg", "00004.jpg", "grid.jpg"]
    for index in range(5):  # the corrupt sample is not drawn
        picture = Image.open(vis_dir / f"{index:05d}.jpg")
        original = Image.open(predictions[index]["image"])
        assert picture.width >= original.width and picture.height > original.height  # original size + caption
    assert Image.open(vis_dir / "grid.jpg").size == (pictures.GRID_COLUMNS * pictures.GRID_CELL, 2 * pictures.GRID_CELL)


def test_metrics_by_threshold_and_size_on_known_boxes():
    """scoring.evaluate on hand-made boxes whose figures are known: each size bucket, each threshold."""
    image_size = [1000, 1000]  # 1% of it is 10,000 px, 10% is 100,000 px
    cases = [  # (true box, predicted box): IoU, centre inside?
        ([0, 0, 50, 50], [0, 0, 50, 50]),  # small (0.25%), IoU 1, centre in
        ([0, 0, 90, 100], [0, 0, 90, 25]),  # small (0.9%), IoU 0.25, centre in
        ([0, 0, 100, 100], [50, 0, 150, 100]),  # medium (exactly 1%), IoU 1/3, centre on the edge: in
        ([0, 0, 200, 200], None),  # medium (4%), parse failure
        ([0, 0, 500, 500], [0, 0, 500, 400]),  # large (25%), IoU 0.8, centre in
        ([0, 0, 400, 400], [300, 300, 200, 500]),  # large, inverted prediction: IoU 0, centre out
        ([0, 0, 10, 10], None),  # its image failed: left out
    ]
    rows = [{"image": [f"{i}.jpg"], "user": "where?"} for i in range(len(cases))]
    predictions = [
        {"raw_output": "", "pred_bbox": predicted, "image_size": image_size, "error": None} for _, predicted in cases
    ]
    predictions[-1] = {"raw_output": None, "pred_bbox": None, "image_size": None, "error": "cannot read image"}
    records, metrics = scoring.evaluate(rows, [true for true, _ in cases], predictions)
    assert [r["iou"] for r in records] == pytest.approx([1, 0.25, 1 / 3, 0, 0.8, 0, None])
    assert metrics["num_samples"] == 6 and metrics["failed_samples"] == 1 and metrics["parse_failures"] == 1
    assert metrics["mean_iou"] == pytest.approx((1 + 0.25 + 1 / 3 + 0.8) / 6)
    expected_acc = {0.1: 4, 0.3: 3, 0.5: 2, 0.7: 2, 0.75: 2, 0.9: 1}
    assert {t: metrics[f"acc@{t}"] * 6 for t in expected_acc} == pytest.approx(expected_acc)
    assert metrics["centre_acc"] == pytest.approx(4 / 6)
    assert {name: size["count"] for name, size in metrics["by_size"].items()} == {"small": 2, "medium": 2, "large": 2}
    assert metrics["by_size"]["small"]["acc@0.3"] == 0.5 and metrics["by_size"]["medium"]["acc@0.3"] == 0.5
    assert metrics["by_size"]["large"]["mean_iou"] == pytest.approx(0.4)
    empty = scoring.evaluate(rows[-1:], [cases[-1][0]], predictions[-1:])[1]
    assert empty["num_samples"] == 0 and empty["acc@0.5"] is None and empty["by_size"]["small"]["count"] == 0


def test_two_processes_give_the_single_process_result(single_process_run, answering_model_dir, data_dir, tmp_path):
    test_set = ["--test_dataset_name", data_dir / "eval.jsonl", "--num_vis", 5]
    model = ["--model_name_or_path", answering_model_dir]
    result, _, _ = run_infer(*model, *test_set, output_dir=tmp_path, launcher=ACCELERATE_2)
    assert "2 process(es)" in result.stdout
    for name in ("predictions.jsonl", "metrics.json"):
        assert (tmp_path / name).read_bytes() == (single_process_run[0] / name).read_bytes()


def test_min_confidence_abstains_and_counts_it(single_process_run, answering_model_dir, data_dir, tmp_path):
    """The same run under a threshold between its confidences: the less confident answers abstain (no box,
    counted, not parse failures); the others keep their boxes."""
    output_dir, _, _, metrics = single_process_run
    # From the file: another test pops the corrupt sample from the fixture's list.
    predictions = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    confidences = sorted(p["confidence"] for p in predictions if p["confidence"] is not None)
    threshold = (confidences[len(confidences) // 2 - 1] + confidences[len(confidences) // 2]) / 2
    result, again, again_metrics = run_infer(
        "--model_name_or_path", answering_model_dir, "--test_dataset_name", data_dir / "eval.jsonl",
        "--num_vis", 2, "--min_confidence", threshold, output_dir=tmp_path,
    )  # fmt: skip
    below = [p["confidence"] is not None and p["confidence"] < threshold for p in predictions]
    assert [p["abstained"] for p in again] == below and sum(below) == again_metrics["abstentions"] > 0
    assert [None if low else p["pred_bbox"] for p, low in zip(predictions, below)] == [p["pred_bbox"] for p in again]
    assert again_metrics["parse_failures"] == metrics["parse_failures"] and "abstained" in result.stdout


def test_zero_shot_base_model_counts_parse_failures_and_logs_to_swanlab(tiny_model_dir, data_dir, tmp_path):
    swanlab_dir = tmp_path / "swanlog"
    result, predictions, metrics = run_infer(
        "--model_name_or_path", tiny_model_dir, "--test_dataset_name", data_dir / "test.jsonl", "--limit", 3,
        "--max_image_side", 112, "--report_to", "swanlab",
        output_dir=tmp_path / "eval", env={"SWANLAB_MODE": "offline", "SWANLAB_LOGDIR": str(swanlab_dir)},
    )  # fmt: skip
    # The untrained model never answers with a box: every sample is a parse failure scored IoU 0, none crashes.
    assert [(p["pred_bbox"], p["iou"]) for p in predictions] == [(None, 0.0)] * 3
    assert all(p["raw_output"] for p in predictions)
    assert {key: metrics[key] for key in ("num_samples", "acc@0.5", "acc@0.75", "mean_iou", "parse_failures")} == {
        "num_samples": 3, "acc@0.5": 0.0, "acc@0.75": 0.0, "mean_iou": 0.0, "parse_failures": 3,
    }  # fmt: skip
    logged_images = glob.glob(str(swanlab_dir / "run-*" / "media" / "image" / "*"))
    assert len(logged_images) == 4, result.stderr  # 3 pictures and the grid


def test_lora_training_merge_and_base_plus_adapter_predict_the_same(
    single_process_run, answering_model_dir, data_dir, tmp_path
):
    adapter_dir = train_lora(answering_model_dir, data_dir / "last4.jsonl", tmp_path / "lora", max_steps=30)
    merged_dir = tmp_path / "merged"
    merge = ["--base_model", answering_model_dir, "--adapter", adapter_dir, "--output_dir", merged_dir]
    run_script("scripts/merge_model.py", *merge)

    test_set = ["--test_dataset_name", data_dir / "eval.jsonl", "--num_vis", 0]
    _, merged, merged_metrics = run_infer("--model_name_or_path", merged_dir, *test_set, output_dir=tmp_path / "eval1")
    _, adapted, adapted_metrics = run_infer(
        "--model_name_or_path", answering_model_dir, "--adapter", adapter_dir, *test_set, output_dir=tmp_path / "eval2"
    )
    assert_same_predictions(merged, adapted, merged_metrics, adapted_metrics)
    assert any(p["pred_bbox"] is not None for p in merged)
    assert [p["raw_output"] for p in adapted] != [p["raw_output"] for p in single_process_run[2]]  # LoRA changed it


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ({"image": ["b.png"], "query": "where is the cup?", "response": '{"bbox": [1, 2, 30, 40]}'}, "bbox_2d"),
        ({"image": ["missing.png"], "query": "where is the cup?", "response": format_answer([1, 2, 3, 4])}, "not found"),
    ],
    ids=["bad_answer", "missing_image"],
)
def test_bad_test_sample_fails_before_loading_the_model(bad_line, message, tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 48)).save(tmp_path / name)
    good_line = {"image": ["a.png"], "query": "where is the sign?", "response": format_answer([1, 2, 30, 40])}
    test_file = tmp_path / "test.jsonl"
    test_file.write_text(json.dumps(good_line) + "\n" + json.dumps(bad_line) + "\n")
    result = run_script(
        "infer.py", "--model_name_or_path", tmp_path / "no_model", "--test_dataset_name", test_file,
        "--output_dir", tmp_path / "out", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"{test_file}: sample 2 ({tmp_path / bad_line['image'][0]}): " in result.stderr and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_image_settings_come_from_training_unless_overridden(processor, tmp_path):
    untrained, trained = tmp_path / "untrained", tmp_path / "trained"
    untrained.mkdir()
    trained.mkdir()
    with pytest.warns(UserWarning, match="training's image size is unknown"):
        default = infer.resolve_image_settings(processor, [str(untrained)], None, QWEN2_5_VL)
    assert default == ImageSettings.from_processor(processor, infer.DEFAULT_MAX_IMAGE_SIDE, QWEN2_5_VL)
    saved = dataclasses.replace(ImageSettings.from_processor(processor, 336, QWEN2_5_VL), min_pixels=28 * 28 * 8)
    saved.save(trained)
    # The adapter dir comes first, then the model dir: the first that holds settings wins.
    assert infer.resolve_image_settings(processor, [str(untrained), str(trained)], None, QWEN2_5_VL) == saved
    with pytest.warns(UserWarning, match="differs from the 336"):
        overridden = infer.resolve_image_settings(processor, [str(trained)], 448, QWEN2_5_VL)
    assert overridden == dataclasses.replace(saved, max_image_side=448)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert infer.resolve_image_settings(processor, [str(trained)], 336, QWEN2_5_VL) == saved


def test_picture_draws_both_boxes_where_they_are(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (400, 300), (128, 128, 128)).save(path)
    record = {"image": str(path), "query": "where?", "gt_bbox": [50, 60, 150, 200], "iou": 0.0}

    def extent(picture, color):
        """(x1, y1, x2, y2) of the pixels of one colour above the caption."""
        ys, xs = np.nonzero((np.asarray(picture)[:300] == color).all(axis=2))
        return (xs.min(), ys.min(), xs.max(), ys.max()) if len(xs) else None

    picture = pictures.draw_prediction({**record, "pred_bbox": [200, 40, 380, 120]})
    true_extent, predicted_extent = extent(picture, pictures.TRUE_COLOR), extent(picture, pictures.PREDICTED_COLOR)
    # The same offset, line and margin apply to both boxes: their drawn extents differ as the boxes do.
    assert [p - t for p, t in zip(predicted_extent, true_extent)] == [200 - 50, 40 - 60, 380 - 150, 120 - 200]
    assert true_extent[2] - true_extent[0] > 100 and true_extent[3] - true_extent[1] > 140  # drawn outside the box
    assert extent(pictures.draw_prediction({**record, "pred_bbox": None}), pictures.PREDICTED_COLOR) is None


def test_mixed_test_file_reports_grounding_and_vqa_accuracy(tiny_model_dir, data_dir, tmp_path):
    rows = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()[:3]]
    general = [
        {"image": rows[0]["image"], "query": "What shape? Answer the question using a single word or phrase.",
         "response": "square", "answers": ["square"] * 9 + ["box"]},
        {"image": rows[1]["image"], "query": "How many? Answer the question using a single word or phrase.",
         "response": "1"},  # no human answers: the response stands for them
    ]  # fmt: skip
    mixed = [rows[0], general[0], rows[1], rows[2], general[1]]
    test_file = data_dir / "mixed_tasks.jsonl"
    test_file.write_text("".join(json.dumps(row) + "\n" for row in mixed))
    _, predictions, metrics = run_infer(
        "--model_name_or_path", tiny_model_dir, "--test_dataset_name", test_file, "--max_image_side", 112,
        output_dir=tmp_path / "eval",
    )  # fmt: skip
    assert [p["query"] for p in predictions] == [row["query"] for row in mixed]  # the file's order
    box_records = [predictions[index] for index in (0, 2, 3)]
    text_records = [predictions[index] for index in (1, 4)]
    assert all("iou" in record and "vqa_accuracy" not in record for record in box_records)
    assert [record["answers"] for record in text_records] == [general[0]["answers"], ["1"] * 10]
    for record in text_records:  # the raw answer kept, and scored from it
        assert record["raw_output"] is not None
        assert record["vqa_accuracy"] == vqa_accuracy(record["raw_output"], record["answers"])
    assert metrics["num_samples"] == 3 and metrics["acc@0.5"] is not None
    assert metrics["vqa_num_samples"] == 2
    assert metrics["vqa_accuracy"] == pytest.approx(sum(record["vqa_accuracy"] for record in text_records) / 2)
