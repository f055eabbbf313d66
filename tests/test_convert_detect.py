"""convert2sft_format.py --task detect, run as a user would, on a small multi-object source drawn by
make_synthetic_data.py --schema coco, with bad objects mixed in; then sft.py on its list rows, both families."""

import json
import math
import os
import re
from collections import Counter

import pytest
from datasets import ClassLabel, Dataset, Features, Image, List, Value

from answers import read_answer_boxes
from conftest import run_script, script_stops, train

SCRIPT = "scripts/convert2sft_format.py"
RANGES = ["--train_range", "0:8", "--val_range", "8:10", "--test_range", "10:12"]
SPLIT_ROWS = {"train": range(0, 8), "val": range(8, 10), "test": range(10, 12)}
QUERY = 'Locate every instance that belongs to the following categories: "{}". Report bbox coordinates in JSON format.'


def convert(data_path, save_path, *extra, check=True):
    return run_script(SCRIPT, "--task", "detect", "--data_path", data_path, "--save_path", save_path, *RANGES,
                      "--num_workers", 1, *extra, check=check)  # fmt: skip


def read_rows(directory, split):
    with open(os.path.join(directory, f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO source of 12 images (1-4 shapes each) with bad annotations added to image 0 and 9: NaN, zero
    width, wholly outside, partly outside (clipped), a crowd region; image 3's file is missing."""
    root = tmp_path_factory.mktemp("detect_source")
    run_script("scripts/make_synthetic_data.py", "--output_dir", root, "--schema", "coco", "--num_samples", 12,
               "--seed", 4, "--min_side", 80, "--max_side", 160, "--colors", "red", "blue", "--shapes", "square", "circle")  # fmt: skip
    instances = json.loads((root / "instances.json").read_text())
    width, height = instances["images"][0]["width"], instances["images"][0]["height"]
    bad = [[float("nan"), 1, 5, 5], [3, 3, 0, 9], [width + 2, 1, 5, 5], [width - 4, height - 4, 10.5, 10.5]]
    for number, box in enumerate(bad):
        instances["annotations"].append({"id": 900 + number, "image_id": 0, "category_id": 1, "bbox": box, "iscrowd": 0})
    instances["annotations"].append({"id": 950, "image_id": 9, "category_id": 2, "bbox": [1, 1, 9, 9], "iscrowd": 1})
    (root / "instances.json").write_text(json.dumps(instances))  # NaN is written as NaN, which json reads back
    (root / instances["images"][3]["file_name"]).unlink()
    return root, instances


def expected_objects(instances, image_index):
    """An image's kept objects as the converter must write them, worked out here: [x, y, w, h] -> corners
    rounded outwards, clipped; bad ones and crowds dropped. (category name, [x1, y1, x2, y2]) pairs."""
    names = {category["id"]: category["name"] for category in instances["categories"]}
    image = instances["images"][image_index]
    objects = []
    for annotation in instances["annotations"]:
        x, y, w, h = annotation["bbox"]
        if annotation["image_id"] != image["id"] or annotation["iscrowd"] or not all(map(math.isfinite, (x, y, w, h))):
            continue
        box = [max(math.floor(x), 0), max(math.floor(y), 0), min(math.ceil(x + w), image["width"]),
               min(math.ceil(y + h), image["height"])]  # fmt: skip
        if w > 0 and h > 0 and box[2] > box[0] and box[3] > box[1]:
            objects.append((names[annotation["category_id"]], box))
    return objects


@pytest.fixture(scope="module")
def converted(coco, tmp_path_factory):
    root, _ = coco
    out = tmp_path_factory.mktemp("detect_out")
    results = {}
    for style in ("per_category", "all_categories"):
        results[style] = convert(root / "instances.json", out / style, "--query_style", style)
    return out, results


@pytest.mark.parametrize("style", ["per_category", "all_categories"])
def test_coco_rows_answer_every_box_of_the_category(coco, converted, style):
    root, instances = coco
    out, results = converted
    for split, rows in SPLIT_ROWS.items():
        records = read_rows(out / style, split)
        by_image = {}
        for record in records:
            by_image.setdefault(int(record["image"][0].split("/")[1][:6]), []).append(record)
        kept_images = [index for index in rows if index != 3]  # image 3's file is missing
        assert sorted(by_image) == kept_images
        for index, image_records in by_image.items():
            objects = expected_objects(instances, index)
            categories = list(dict.fromkeys(name for name, _ in sorted(objects, key=lambda o: (o[1][1], o[1][0]))))
            answers = [(r["query"], read_answer_boxes(r["response"])) for r in image_records]
            for _, answer in answers:  # reading order: top, then left
                assert [o["bbox_2d"][1::-1] for o in answer] == sorted(o["bbox_2d"][1::-1] for o in answer)
            written = {query: sorted((o["label"], o["bbox_2d"]) for o in answer) for query, answer in answers}
            if style == "per_category":
                expected = {QUERY.format(name): sorted((n, [float(v) for v in b]) for n, b in objects if n == name)
                            for name in categories}  # fmt: skip
            else:
                expected = {QUERY.format(", ".join(categories)): sorted((n, [float(v) for v in b]) for n, b in objects)}
            assert written == expected, (split, index)
    # Image 0: 4 bad boxes after its own n: NaN, zero width and wholly outside are skipped and listed (the
    # fourth is clipped); image 3's file is missing.
    n = sum(annotation["image_id"] == 0 and annotation["id"] < 900 for annotation in instances["annotations"])
    skipped = [json.loads(line) for line in open(out / style / "skipped_train.jsonl")]
    assert [(s["row"], s.get("object"), s["reason"].split(":")[0]) for s in skipped[:2]] == [
        (0, n, "bbox is not 4 finite numbers"), (0, n + 1, "zero or negative size"),
    ]  # fmt: skip
    size = "{width}x{height}".format(**instances["images"][0])
    assert (skipped[2]["row"], skipped[2]["object"]) == (0, n + 2) and f"lies outside the {size} image" in skipped[2]["reason"]
    assert (skipped[3]["row"], "object" in skipped[3], skipped[3]["reason"].split(":")[0]) == (3, False, "unreadable image")
    assert len(skipped) == 4
    stdout = results[style].stdout
    assert "left out 1 crowd annotations" in stdout
    assert "skipped 1 bad rows" in stdout and "of which 1 clipped to their image; skipped 3 bad objects" in stdout
    kept = sum(len(expected_objects(instances, index)) for index in SPLIT_ROWS["train"] if index != 3)
    assert f"train objects: kept {kept}, of which 1 clipped" in stdout


def parquet_from_coco(root, instances, directory, category_feature, category_of):
    """The same images and objects as parquet rows with `objects`, written here from the COCO file."""
    rows = []
    for index, image in enumerate(instances["images"]):
        path = root / image["file_name"]
        image_bytes = path.read_bytes() if path.exists() else b"not an image"
        annotations = [a for a in instances["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
        rows.append({"image": {"bytes": image_bytes, "path": None},
                     "objects": {"bbox": [a["bbox"] for a in annotations],
                                 "category": [category_of(a["category_id"]) for a in annotations]}})  # fmt: skip
    features = Features({"image": Image(), "objects": {"bbox": List(List(Value("float64"))), "category": List(category_feature)}})
    os.makedirs(directory / "data")
    Dataset.from_list(rows, features=features).to_parquet(str(directory / "data" / "train-00000-of-00001.parquet"))
    return directory


def test_parquet_with_names_ids_or_classlabel_gives_the_coco_output(coco, converted, tmp_path):
    root, instances = coco
    out, _ = converted
    names = {category["id"]: category["name"] for category in instances["categories"]}
    ordered = [names[key] for key in sorted(names)]
    sources = {
        "names": (parquet_from_coco(root, instances, tmp_path / "names", Value("string"), names.get), ()),
        "ids": (parquet_from_coco(root, instances, tmp_path / "ids", Value("int64"), lambda i: i - 1),
                ("--categories", tmp_path / "names.txt")),
        "classlabel": (parquet_from_coco(root, instances, tmp_path / "label", ClassLabel(names=ordered), lambda i: i - 1), ()),
    }  # fmt: skip
    (tmp_path / "names.txt").write_text("\n".join(ordered) + "\n")
    for name, (source, extra) in sources.items():
        convert(source, tmp_path / f"out_{name}", *extra)
        for split in SPLIT_ROWS:
            assert read_rows(tmp_path / f"out_{name}", split) == read_rows(out / "per_category", split), (name, split)


def test_negatives_ask_for_absent_categories_at_the_ratio_whatever_the_workers(coco, tmp_path):
    root, instances = coco
    names = sorted(category["name"] for category in instances["categories"])
    counts = {}
    for ratio, workers in (("0.5", 1), ("0.5", 2), ("2", 1)):
        out = tmp_path / f"{ratio}_{workers}"
        run_script(SCRIPT, "--task", "detect", "--data_path", root / "instances.json", "--save_path", out,
                   "--type", "train", "--train_range", "0:12", "--negatives", ratio, "--seed", 3, "--num_workers", workers)  # fmt: skip
        records = read_rows(out, "train")
        positives = [r for r in records if r["response"] != "[]"]
        negatives = [r for r in records if r["response"] == "[]"]
        for record in negatives:
            asked = record["query"].split('"')[1]
            image_index = int(record["image"][0].split("/")[1][:6])
            assert asked in names and asked not in {n for n, _ in expected_objects(instances, image_index)}, record
        counts[(ratio, workers)] = (len(positives), len(negatives), records)
    assert counts[("0.5", 1)][2] == counts[("0.5", 2)][2]  # seeded by the row, not by the worker
    positives, negatives, _ = counts[("0.5", 1)]
    assert 0.2 * positives <= negatives <= 0.8 * positives, counts[("0.5", 1)][:2]
    # Ratio 2 asks for every absent category where fewer than 2 per row are left (4 categories here).
    positives, negatives, records = counts[("2", 1)]
    assert negatives > counts[("0.5", 1)][1]
    by_image = Counter(r["image"][0] for r in records if r["response"] == "[]")
    for image, count in by_image.items():
        present = {n for n, _ in expected_objects(instances, int(image.split("/")[1][:6]))}
        rows = sum(r["image"][0] == image and r["response"] != "[]" for r in records)
        assert count == min(2 * rows, len(names) - len(present)), image


def test_groups_add_a_row_per_group_present(coco, tmp_path):
    root, instances = coco
    groups = json.loads((root / "groups.json").read_text())
    assert groups["red shape"] == ["red square", "red circle"] and groups["circle"] == ["red circle", "blue circle"]
    convert(root / "instances.json", tmp_path / "out", "--groups", root / "groups.json")
    for record in read_rows(tmp_path / "out", "train"):
        asked = record["query"].split('"')[1]
        if asked in groups:
            image_index = int(record["image"][0].split("/")[1][:6])
            expected = sorted((n, [float(v) for v in b]) for n, b in expected_objects(instances, image_index) if n in groups[asked])
            assert sorted((o["label"], o["bbox_2d"]) for o in read_answer_boxes(record["response"])) == expected


def test_bad_detection_inputs_fail_naming_the_file_and_place(coco, tmp_path):
    root, instances = coco
    broken = json.loads(json.dumps(instances))
    broken["annotations"][2]["category_id"] = 77
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    result = convert(tmp_path / "broken.json", tmp_path / "out", "--image_dir", root, check=False)  # as a user runs it
    assert result.returncode != 0
    assert f"broken.json: annotations[2] (id {broken['annotations'][2]['id']}): category_id 77 is not in categories" in result.stderr

    def stops(data_path, *extra):
        args = ["--task", "detect", "--data_path", data_path, "--save_path", tmp_path / "out", *RANGES, *extra]
        return script_stops("convert2sft_format", *args)

    (tmp_path / "no_images.json").write_text(json.dumps({"annotations": [], "categories": []}))
    assert "no_images.json: a COCO instances file needs the keys ['images']" in stops(tmp_path / "no_images.json")
    names = {category["id"]: category["name"] for category in instances["categories"]}
    ids = parquet_from_coco(root, instances, tmp_path / "ids", Value("int64"), lambda i: i - 1)
    message = stops(ids)
    assert "objects.category holds ids" in message and "--categories FILE" in message
    (tmp_path / "gap.txt").write_text(f"{names[1]}\n\n{names[2]}\n")
    assert "gap.txt:2: empty line" in stops(ids, "--categories", tmp_path / "gap.txt")
    (tmp_path / "short.txt").write_text(f"{names[1]}\n")
    message = stops(ids, "--categories", tmp_path / "short.txt")
    assert re.search(r"ids: row \d+: category ids \[[\d, ]+\] are not named in \S+short.txt", message), message
    message = stops(root / "instances.json", "--query_style", "all_categories", "--groups", root / "groups.json")
    assert "--groups asks a row per group: it needs --query_style per_category" in message
    assert "instances.json names its own categories" in stops(root / "instances.json", "--categories", tmp_path / "short.txt")
    assert "--negatives -1.0: give a ratio >= 0" in stops(root / "instances.json", "--negatives", "-1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family_fixture", ["tiny_model_dir", "tiny_qwen3_vl_dir"])
def test_sft_trains_on_list_rows(family_fixture, converted, request, tmp_path):
    """sft.py on the converter's list rows (several boxes, and [] with negatives), both families: the loss,
    all of it on list answers, falls."""
    out, _ = converted
    model_dir = request.getfixturevalue(family_fixture)
    run_dir = train(model_dir, out / "per_category" / "train.jsonl", tmp_path / "model", "--max_steps", 12,
                    "--logging_steps", 1, "--learning_rate", 3e-3)  # fmt: skip
    state = json.loads(open(os.path.join(run_dir, "trainer_state.json")).read())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 12 and len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
