"""scripts/convert2sft_format.py, run as a user would, on the three local layouts of one small
TextVQA-schema dataset: the synthetic rows plus bad and edge-case rows mixed in."""

import hashlib
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import datasets
import numpy as np
import pytest
from datasets import Dataset, load_dataset
from PIL import Image

from conftest import REPO_DIR, run_script, script_stops
from utils import load_sft_jsonl

SCRIPT = "scripts/convert2sft_format.py"
TRAIN_RANGE, VAL_RANGE, TEST_RANGE = (0, 32), (32, 40), (40, 52)
RANGES = {"train": TRAIN_RANGE, "val": VAL_RANGE, "test": TEST_RANGE}
# What the ModelScope uploader's dataset_infos.json looks like: old-style Values without "dtype",
# which made `datasets.load_dataset(dir)` fail and users delete the file.
LEGACY_DATASET_INFOS = {
    "textvqa_bbox": {
        "description": "",
        "citation": "",
        "features": {
            "image": {"_type": "Image"},
            "question": {"_type": "Value"},
            "answer": {"feature": {"_type": "Value"}, "_type": "Sequence"},
            "dataset_id": {"_type": "Value"},
            "bbox": {"feature": {"_type": "Value"}, "_type": "Sequence"},
        },
        "splits": {"train": {"name": "train", "num_bytes": 0, "num_examples": 52, "dataset_name": "textvqa_bbox"}},
    }
}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def special_rows(template: dict) -> list[tuple[dict, object]]:
    """(row, expected) pairs: expected is the response box, or a word the skip reason must contain. Each row
    has an image of its own, the template's size in its own colour: no image is shared across splits here."""
    width, height = Image.open(io.BytesIO(template["image"]["bytes"])).size
    shades = iter(range(20, 250, 15))

    def own_image():
        return Image.new("RGB", (width, height), (next(shades), 90, 160))

    def row(bbox, question="where is it?", image_bytes=None):
        image_bytes = image_bytes or png_bytes(own_image())
        return {**template, "image": {"bytes": image_bytes, "path": None}, "question": question, "bbox": bbox}

    return [
        (row([10.0, 10.0, 0.0, 20.0]), "zero or negative size"),
        (row([10.4, 20.6, 30.2, 40.5]), [10, 20, 41, 62]),  # corners rounded outwards: never shrinks
        (row([float("nan"), 5.0, 10.0, 10.0]), "finite"),
        (row([width + 5.0, 5.0, 10.0, 10.0]), "outside"),
        (row([width - 10.0, height - 10.0, 30.0, 30.0]), [width - 10, height - 10, width, height]),  # clipped
        (row([5.0, 5.0, 10.0, -3.0]), "zero or negative size"),
        (row([5.0, 5.0, 10.0, 10.0], question="  "), "missing question"),
        (row([5.0, 5.0, 10.0, 10.0], image_bytes=png_bytes(own_image().convert("L"))), [5, 5, 15, 15]),
        (row([5.0, 5.0, 10.0, 10.0], question=None), "missing question"),
        (row([5.0, 5.0, 10.0, 10.0], image_bytes=b"not an image"), "unreadable image"),
        (row([5.0, 5.0, 10.0, 10.0], image_bytes=png_bytes(own_image().convert("RGBA"))), [5, 5, 15, 15]),
        (row([5.0, 5.0, 10.0, 10.0], image_bytes=template["image"]["bytes"][:200]), "unreadable image"),
    ]


def write_parquet_shards(dataset: Dataset, directory: str, prefix: str = "") -> None:
    os.makedirs(os.path.join(directory, prefix), exist_ok=True)
    for index in range(2):
        shard = dataset.shard(num_shards=2, index=index, contiguous=True)
        shard.to_parquet(os.path.join(directory, prefix, f"train-{index:05d}-of-00002.parquet"))


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def convert(data_path, save_path, *extra, env):
    return run_script(
        SCRIPT, "--data_path", data_path, "--save_path", save_path, "--type", "all",
        "--train_range", "{}:{}".format(*TRAIN_RANGE), "--val_range", "{}:{}".format(*VAL_RANGE),
        "--test_range", "{}:{}".format(*TEST_RANGE), *extra, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def source(synthetic_dataset_dir, tmp_path_factory):
    """The source rows with their expectations, saved in the Hub, save_to_disk and ModelScope layouts."""
    root = tmp_path_factory.mktemp("convert_source")
    synthetic = load_dataset(synthetic_dataset_dir, split="train")
    features = synthetic.features
    rows = list(synthetic.cast_column("image", datasets.Image(decode=False)))
    specials = special_rows(rows[0])
    all_rows, expected = [], []
    for index, row in enumerate(rows):
        x, y, box_w, box_h = row["bbox"]  # synthetic boxes are whole pixels, inside the image
        all_rows.append(row)
        expected.append([int(x), int(y), int(x + box_w), int(y + box_h)])
        if index % 4 == 1 and specials:
            special, expectation = specials.pop(0)
            all_rows.append(special)
            expected.append(expectation)
    for special, expectation in specials:
        all_rows.append(special)
        expected.append(expectation)
    assert len(all_rows) == TEST_RANGE[1]
    dataset = Dataset.from_list(all_rows, features=features)

    layouts = {"hub": str(root / "hub"), "disk": str(root / "disk"), "modelscope": str(root / "modelscope")}
    write_parquet_shards(dataset, layouts["hub"], prefix="data")
    dataset.save_to_disk(layouts["disk"], num_shards=2)
    write_parquet_shards(dataset, layouts["modelscope"])
    with open(os.path.join(layouts["modelscope"], "dataset_infos.json"), "w") as f:
        json.dump(LEGACY_DATASET_INFOS, f)
    return {"root": root, "dataset": dataset, "expected": expected, "layouts": layouts}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("hf_datasets_cache"))}


@pytest.fixture(scope="module")
def converted(source, env):
    infos_path = os.path.join(source["layouts"]["modelscope"], "dataset_infos.json")
    infos_hash = sha256(infos_path)
    outputs, stdouts = {}, {}
    for name, data_path in source["layouts"].items():
        outputs[name] = str(source["root"] / f"out_{name}")
        workers = "2" if name == "hub" else "1"  # the result must not depend on the worker count
        stdouts[name] = convert(data_path, outputs[name], "--num_workers", workers, env=env).stdout
    return {"outputs": outputs, "stdouts": stdouts, "infos_path": infos_path, "infos_hash": infos_hash}


def read_tree(directory: str) -> dict[str, bytes]:
    tree = {}
    for folder, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                tree[os.path.relpath(path, directory)] = f.read()
    return tree


def test_all_layouts_give_identical_output(converted):
    trees = {name: read_tree(path) for name, path in converted["outputs"].items()}
    assert {f"{prefix}{split}.jsonl" for prefix in ("", "skipped_") for split in RANGES} < set(trees["hub"])
    assert len(trees["hub"]) > 40  # the images too
    assert trees["hub"] == trees["disk"] == trees["modelscope"]


def test_modelscope_dataset_infos_untouched_and_really_legacy(source, converted):
    assert sha256(converted["infos_path"]) == converted["infos_hash"]
    # the fixture reproduces the users' failure: plain load_dataset(dir) rejects the file
    with pytest.raises(TypeError, match="dtype"):
        load_dataset(source["layouts"]["modelscope"], split="train")


@pytest.mark.parametrize("split", list(RANGES))
def test_responses_skips_and_images(source, converted, split, tmp_path):
    output = converted["outputs"]["disk"]
    rows = range(*RANGES[split])
    good = [index for index in rows if isinstance(source["expected"][index], list)]
    bad = [index for index in rows if not isinstance(source["expected"][index], list)]
    assert bad, "every split must exercise skipping"

    with open(os.path.join(output, f"{split}.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["image"] for r in records] == [[f"{split}/{index:06d}.jpg"] for index in good]
    assert [r["query"] for r in records] == [source["dataset"][index]["question"] for index in good]
    assert [json.loads(r["response"]) for r in records] == [{"bbox_2d": source["expected"][i]} for i in good]

    with open(os.path.join(output, f"skipped_{split}.jsonl")) as f:
        skipped = [json.loads(line) for line in f]
    assert [s["row"] for s in skipped] == bad
    for entry in skipped:
        assert source["expected"][entry["row"]] in entry["reason"], entry
    assert f"{split}: {len(good)} rows" in converted["stdouts"]["disk"]
    assert f"skipped {len(bad)} bad rows" in converted["stdouts"]["disk"]
    assert sorted(os.listdir(os.path.join(output, split))) == [f"{index:06d}.jpg" for index in good]

    # Images: RGB, original size, same pixels (up to JPEG loss) as the source row.
    for index in good:
        with Image.open(os.path.join(output, split, f"{index:06d}.jpg")) as saved:
            assert saved.mode == "RGB"
            source_image = source["dataset"][index]["image"].convert("RGB")
            assert saved.size == source_image.size
            difference = np.abs(np.asarray(saved, dtype=np.int16) - np.asarray(source_image, dtype=np.int16))
            assert difference.mean() < 3, (index, difference.mean())

    # A converted dir can be moved: image paths are relative to the JSONL.
    moved = shutil.copytree(output, tmp_path / "moved")
    loaded = load_sft_jsonl(str(moved / f"{split}.jsonl"))
    assert all(os.path.isfile(row["image"][0]) and str(moved) in row["image"][0] for row in loaded)


def test_xyxy_source_gives_the_same_output(source, converted, env, tmp_path):
    def to_corners(row):
        x, y, box_w, box_h = row["bbox"]
        return {"bbox": [x, y, x + box_w, y + box_h]}

    corners = source["dataset"].map(to_corners)
    write_parquet_shards(corners, str(tmp_path / "xyxy"), prefix="data")
    convert(tmp_path / "xyxy", tmp_path / "out", "--bbox_format", "xyxy", "--num_workers", "1", env=env)
    reference = converted["outputs"]["hub"]

    def read(directory, name):
        with open(os.path.join(directory, name)) as f:
            return f.read()

    for split in RANGES:
        assert read(tmp_path / "out", f"{split}.jsonl") == read(reference, f"{split}.jsonl")
        skipped, reference_skipped = (
            [json.loads(line)["row"] for line in read(directory, f"skipped_{split}.jsonl").splitlines()]
            for directory in (tmp_path / "out", reference)
        )
        assert skipped == reference_skipped


def test_splits_are_by_image_so_no_image_is_in_two_splits(synthetic_dataset_dir, env, tmp_path):
    """Several rows on one image, as TextVQA's several questions per image: a row whose image a held-out split
    holds (test before val before train) is left out of its own split, counted and listed, never lost."""
    synthetic = load_dataset(synthetic_dataset_dir, split="train").cast_column("image", datasets.Image(decode=False))
    # The synthetic image each row shows; train 0:12, val 12:18, test 18:24. Image 20 is in all three
    # splits, 21 in train and val, 22 in train and test, 23 in val and test, 2 twice within train.
    images = [0, 1, 2, 20, 3, 2, 4, 5, 6, 7, 21, 22] + [8, 21, 20, 23, 20, 9] + [10, 23, 22, 11, 20, 12]
    left_out = {"train": {3: ("test", 22), 10: ("val", 13), 11: ("test", 20)}, "val": {14: ("test", 22),
                15: ("test", 19), 16: ("test", 22)}, "test": {}}  # fmt: skip
    write_parquet_shards(synthetic.select(images), str(tmp_path / "source"), prefix="data")
    ranges = {"train": "0:12", "val": "12:18", "test": "18:24"}
    arguments = [SCRIPT, "--data_path", tmp_path / "source", "--num_workers", 1]
    arguments += [argument for split, rows in ranges.items() for argument in (f"--{split}_range", rows)]
    result = run_script(*arguments, "--save_path", tmp_path / "out", env=env)

    image_hashes = {}
    for split, rows in ranges.items():
        records = load_sft_jsonl(str(tmp_path / "out" / f"{split}.jsonl"))
        skipped = [json.loads(line) for line in open(tmp_path / "out" / f"skipped_{split}.jsonl")]
        assert {entry["row"] for entry in skipped} == set(left_out[split]), skipped
        for entry in skipped:
            assert "same image as {} row {}".format(*left_out[split][entry["row"]]) in entry["reason"], entry
        start, end = map(int, rows.split(":"))
        assert len(records) + len(skipped) == end - start  # every row is written or listed
        image_hashes[split] = {sha256(record["image"][0]) for record in records}
        shared = f" and {len(left_out[split])} rows whose image another split keeps" if left_out[split] else ""
        assert f"{split}: {len(records)} rows (from {len(records)} dataset rows)" in result.stdout
        assert f"skipped 0 bad rows{shared} (listed in" in result.stdout
    assert len(image_hashes["train"]) == 8  # 9 rows kept, two of them on image 2
    for first, second in itertools.combinations(ranges, 2):
        assert not image_hashes[first] & image_hashes[second], (first, second)

    # Converting train alone still leaves out the held-out splits' images.
    run_script(*arguments, "--save_path", tmp_path / "train_only", "--type", "train", env=env)
    for name in ("train.jsonl", "skipped_train.jsonl"):
        assert (tmp_path / "train_only" / name).read_text() == (tmp_path / "out" / name).read_text()


def test_killed_conversion_leaves_no_complete_looking_jsonl(source, env, tmp_path):
    # 240 rows (the dataset repeated) take a few seconds; kill once a few images are written.
    big = datasets.concatenate_datasets([source["dataset"].select(range(40))] * 6)
    write_parquet_shards(big, str(tmp_path / "big"), prefix="data")
    save_path = tmp_path / "out"
    arguments = [SCRIPT, "--data_path", str(tmp_path / "big"), "--save_path", str(save_path), "--type", "train"]
    process = subprocess.Popen(
        [sys.executable, *arguments, "--train_range", "0:240", "--test_range", "240:", "--num_workers", "2"],
        cwd=REPO_DIR, env={**os.environ, **env}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        partial_images = save_path / "train.partial"
        deadline = time.time() + 120
        while not (partial_images.is_dir() and len(os.listdir(partial_images)) >= 5):
            assert process.poll() is None, "conversion ended before it could be killed"
            assert time.time() < deadline, "conversion did not start writing images"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the script and its worker processes, like a crash
        process.wait()
    left = sorted(os.listdir(save_path))
    assert "train.jsonl" not in left and "skipped_train.jsonl" not in left and "train" not in left, left
    assert "train.jsonl.partial" in left

    # --test_range stays empty: rows 40: repeat rows 0:40, so as a test range they would claim every image.
    result = run_script(*arguments, "--train_range", "0:40", "--test_range", "240:", "--num_workers", "1", env=env)
    assert sorted(os.listdir(save_path)) == ["skipped_train.jsonl", "train", "train.jsonl"], result.stdout
    assert len(load_sft_jsonl(str(save_path / "train.jsonl"))) == sum(
        isinstance(source["expected"][index], list) for index in range(40)
    )


def test_bad_arguments_fail_with_clear_errors(source, env, tmp_path):
    # One run as a user runs it; the other checks call the converter's main() in this process.
    result = run_script(
        SCRIPT, "--data_path", source["layouts"]["hub"], "--save_path", tmp_path, "--train_range", "0:45",
        "--test_range", "40:52", env=env, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "--train_range 0:45 overlaps --test_range 40:52" in result.stderr
    hub = ["--data_path", source["layouts"]["hub"], "--save_path", tmp_path]
    message = script_stops("convert2sft_format", *hub, "--train_range", "0:30", "--val_range", "30:41", "--test_range", "40:52")
    assert "--val_range 30:41 overlaps --test_range 40:52" in message
    # The default ranges on a smaller dataset: the message names the value that works.
    message = script_stops("convert2sft_format", *hub)
    assert "--train_range 0:3000 is not inside the 52 rows of split train" in message
    assert "END <= 52, or START: (e.g. 0:) to read to the end" in message
    assert "no such directory" in script_stops("convert2sft_format", "--data_path", tmp_path / "missing", "--save_path", tmp_path)
    assert not os.listdir(tmp_path)


def test_refcoco_schema_gives_one_row_per_expression(env, tmp_path):
    source_dir = tmp_path / "refcoco"
    make = ["--output_dir", source_dir, "--num_samples", 4, "--seed", 5, "--schema", "refcoco", "--split", "testA"]
    run_script("scripts/make_synthetic_data.py", *make)
    parquet = source_dir / "data" / "testA-00000-of-00001.parquet"
    dataset = load_dataset("parquet", data_files=str(parquet), split="train")
    bad_rows = [
        {**dataset[0], "answer": []}, {**dataset[1], "answer": ["a cup", " "]}, {**dataset[2], "bbox": [5, 5, 0, 9]},
    ]  # fmt: skip
    bad_rows = [{**row, "image": {"bytes": png_bytes(row["image"]), "path": None}} for row in bad_rows]
    datasets.concatenate_datasets([dataset, Dataset.from_list(bad_rows, features=dataset.features)]).to_parquet(parquet)

    arguments = ["--data_path", source_dir, "--save_path", tmp_path / "out", "--type", "test", "--split", "testA"]
    result = run_script(SCRIPT, *arguments, "--query_column", "answer", "--test_range", "0:", env=env)
    assert "test: 8 rows (from 4 dataset rows)" in result.stdout
    records = [json.loads(line) for line in open(tmp_path / "out" / "test.jsonl")]
    expected = []
    for index, row in enumerate(dataset):
        x, y, box_w, box_h = row["bbox"]  # COCO [x, y, width, height], whole pixels here
        box = {"bbox_2d": [int(x), int(y), int(x + box_w), int(y + box_h)]}
        expected += [([f"test/{index:06d}.jpg"], expression, box) for expression in row["answer"]]
    assert [(r["image"], r["query"], json.loads(r["response"])) for r in records] == expected
    assert len({query for _, query, _ in expected}) == 8  # two different expressions per box
    skipped = [json.loads(line) for line in open(tmp_path / "out" / "skipped_test.jsonl")]
    assert [(s["row"], s["reason"].split(":")[0]) for s in skipped] == [
        (4, "missing question"), (5, "missing question"), (6, "zero or negative size"),
    ]  # fmt: skip

    # The instruction column instead of the expressions: converted, but the user is warned.
    result = run_script(SCRIPT, *arguments, "--test_range", "0:4", env=env)
    assert "every test row has the query 'Please carefully observe" in result.stderr
    result = run_script(SCRIPT, *arguments[:-1], "val", "--test_range", "0:", env=env, check=False)
    assert result.returncode != 0 and "no --split val" in result.stderr and "testA" in result.stderr


def test_vqa_task_writes_the_most_common_answer_and_keeps_all(synthetic_dataset_dir, env, tmp_path):
    dataset = load_dataset(synthetic_dataset_dir, split="train").select(range(6))
    answers = [
        ["Two", "2", "two.", "the two"] + ["three"] * 3 + ["4"] * 3,  # "2" in four spellings wins only normalised
        ["coca cola"] * 4 + ["Coca-Cola"] * 4 + ["pepsi"] * 2,  # a tie: the first answer's
        ["stop"] * 10,
        [],  # no human answer: skipped
        ["yes"] * 3 + ["no"] * 7,
        ["red"] * 10,
    ]
    rows = [{**row, "answer": row_answers} for row, row_answers in zip(dataset, answers)]
    rows[2]["bbox"] = [5.0, 5.0, 0.0, 9.0]  # a bad box does not matter to the question
    source_dir = tmp_path / "source"
    Dataset.from_list(rows, features=dataset.features).to_parquet(str(source_dir / "data" / "train-00000-of-00001.parquet"))
    ranges = ["--train_range", "0:4", "--val_range", "4:5", "--test_range", "5:6", "--num_workers", "1"]
    run_script(SCRIPT, "--data_path", source_dir, "--save_path", tmp_path / "out", "--task", "vqa", *ranges, env=env)

    assert not (tmp_path / "out" / "train.jsonl").exists()  # the grounding files are another task's
    train = load_sft_jsonl(str(tmp_path / "out" / "train_vqa.jsonl"))
    question = dataset[0]["question"]
    assert [row["assistant"] for row in train] == ["Two", "coca cola", "stop"]
    assert [row["answers"] for row in train] == answers[:3]
    assert train[0]["user"] == f"{question} Answer the question using a single word or phrase."
    assert all(os.path.isfile(row["image"][0]) and "/train_vqa/" in row["image"][0] for row in train)
    skipped = [json.loads(line) for line in open(tmp_path / "out" / "skipped_train_vqa.jsonl")]
    assert [(entry["row"], entry["reason"].split(":")[0]) for entry in skipped] == [(3, "missing or empty human answers")]
    assert [row["assistant"] for row in load_sft_jsonl(str(tmp_path / "out" / "val_vqa.jsonl"))] == ["no"]


def test_general_questions_are_answered_by_the_image(env, tmp_path):
    """make_synthetic_data.py --general_questions: the colour answered is the objects' colour, the only named
    colour drawn, and the count answered is the number of separate objects of it."""
    from scipy import ndimage

    colors = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
    run_script(
        "scripts/make_synthetic_data.py", "--output_dir", tmp_path, "--general_questions", "--num_samples", 24,
        "--max_side", 112, "--min_object", 0.25, "--max_object", 0.35, "--colors", *colors, "--seed", 3,
    )  # fmt: skip
    kinds = set()
    for row in load_dataset(str(tmp_path), split="train"):
        pixels = np.asarray(row["image"])
        drawn = [name for name, rgb in colors.items() if (pixels == rgb).all(axis=-1).any()]
        assert len(drawn) == 1 and len(set(row["answer"])) == 1
        masks, count = ndimage.label((pixels == colors[drawn[0]]).all(axis=-1))
        question, answer = row["question"], row["answer"][0]
        kind = question.split()[1]  # colour, shape or many
        kinds.add(kind)
        expected = {"colour": drawn[0], "many": str(count)}.get(kind)
        assert kind == "shape" and answer in ("square", "circle", "triangle") or answer == expected, (question, answer)
    assert kinds == {"colour", "shape", "many"}
