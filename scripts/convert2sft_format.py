"""Convert TextVQA_GT_bbox (or a RefCOCO-style grounding set) into the query/response JSONL that
sft.py trains on and infer.py evaluates.

    python scripts/convert2sft_format.py --data_path DIR_OR_ID --save_path data --type all
    python scripts/convert2sft_format.py --data_path lmms-lab/RefCOCO --split val --query_column answer \
        --save_path data_refcoco --type test --test_range 0:

writes data/{train,val,test}.jsonl, the images under data/train/, data/val/ and data/test/, and
data/skipped_{train,val,test}.jsonl listing the rows left out. val.jsonl is the validation split that the
configs evaluate on during training (test_dataset_name); test.jsonl is kept for infer.py's final score.
One JSONL line:

    {"image": ["train/000123.jpg"], "query": "what is ...?", "response": "{\"bbox_2d\": [x1, y1, x2, y2]}"}

Image paths are relative to the JSONL's folder; images are RGB at their original size, named by
their 0-based dataset row. The box is in original pixels, pixel edges (0 <= x1 < x2 <= width):
TextVQA stores [x, y, width, height], so x2 = x + width; so does RefCOCO (COCO boxes). Corners are
rounded outwards (x1, y1 down, x2, y2 up) so the box never shrinks, then clipped to the image.

The query comes from --query_column (TextVQA: question). A list-valued query (RefCOCO's `answer`
holds the referring expressions of one box) gives one JSONL row per expression, all on the same
image file. --split names the source split (TextVQA has only train; lmms-lab/RefCOCO has val, test,
testA, testB); --train_range, --val_range and --test_range are row ranges of that split. Their defaults
(0:3000, 3100:3200, 3000:3100) suit TextVQA: train and test are the tutorial's rows, val the 100 after
them; on a smaller set pass e.g. --test_range 0: (to the end).

Splits are by image, not by row: TextVQA asks several questions about one image, and a row whose image
(the same encoded bytes) is also in a held-out range is left out of the later split in the order test,
val, train. So test keeps all its rows, no image is in two splits, and each row left out is counted and
listed in skipped_{split}.jsonl with the row that keeps its image.

--task vqa writes the general task from the same rows instead: question -> answer, for mixing into grounding
training (sft.py's train_dataset_weights) and for measuring what grounding SFT forgets (infer.py's
vqa_accuracy). The target is the most common human answer (counted after VQA normalisation, written as a
human spelled it), the question gets VQA_INSTRUCTION, and all human answers are kept for scoring; the files
are {split}_vqa.jsonl, skipped_{split}_vqa.jsonl and {split}_vqa/ beside the grounding ones, split by image
exactly as they are. One line:

    {"image": ["train_vqa/000123.jpg"], "query": "what is ...? Answer the question using a single word or phrase.",
     "response": "coca cola", "answers": ["coca cola", "coca-cola", ...]}

--task detect reads a detection source instead (scripts/sources.py): a COCO instances.json (its
file_names relative to --image_dir, default the JSON's folder) or parquet rows with `image` and `objects`
{bbox: [[x, y, w, h], ...], category: [...]} (names, or ids named by --categories FILE). Each image gives rows
asking Qwen's cookbook prompt, answered with every matching box in original pixels, in reading order:

    {"image": ["train/000007.jpg"], "query": "Locate every instance that belongs to the following categories:
     \"red circle\". Report bbox coordinates in JSON format.", "response": "[{\"bbox_2d\": [12, 40, 61, 90],
     \"label\": \"red circle\"}, ...]"}

--query_style per_category (a row per category present; --groups FILE adds a row per group present, e.g.
"red shape") or all_categories (one row naming them all); --negatives R adds R rows per row asking for a
category absent from the image, answered "[]" (seeded by --seed and the row). Ranges count images. An object
whose box is bad is skipped and listed in skipped_{split}.jsonl with its row and "object" number; boxes
reaching past the image are clipped; both are counted on the split's "objects" line.

    python scripts/convert2sft_format.py --task detect --data_path coco/annotations/instances_val2017.json \
        --image_dir coco/val2017 --save_path data_coco --train_range 0:4000 --test_range 4000:4500 \
        --val_range 4500:5000 --negatives 0.3

--data_path takes: a local dir of parquet shards (Hub layout data/train-*.parquet, or a ModelScope
download, whose legacy dataset_infos.json is ignored, never edited), a `save_to_disk` dir, a
Hugging Face dataset id (jrzhang/TextVQA_GT_bbox) or, with --hub modelscope, a ModelScope id
(Tina12345/textVQA_groundingtask_bbox).
"""

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import sys
from collections import Counter
from multiprocessing import Pool

import torch
from datasets import Image
from PIL.Image import DecompressionBombError, UnidentifiedImageError
from torchvision.ops import box_convert
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from answers import format_answer, valid_box_values  # noqa: E402
from sources import ALL_CATEGORIES, PER_CATEGORY, detection_records, load_detection_source, load_source  # noqa: E402
from utils import clip_box  # noqa: E402
from vqa_accuracy import normalize_answer  # noqa: E402

SPLITS = ("train", "val", "test")
# Held-out splits claim their images first: a row whose image an earlier split here holds is left out.
CLAIM_ORDER = ("test", "val", "train")
# The short-answer instruction of Qwen2.5-VL's and LLaVA's VQA evaluations: a text question carries its own
# (answers.build_messages adds the box instruction to single-box questions only).
VQA_INSTRUCTION = "Answer the question using a single word or phrase."


def parse_range(text: str) -> tuple[int, int | None]:
    """'3000:3100' -> (3000, 3100); an empty end means the end of the dataset."""
    start, sep, end = text.partition(":")
    if not sep or not (start or "0").isdigit() or not (end or "0").isdigit():
        raise argparse.ArgumentTypeError(f"expected START:END row indices, e.g. 0:3000, got {text!r}")
    return int(start or 0), int(end) if end else None


def image_identity(image: dict) -> str:
    """What makes two rows the same image: a hash of its encoded bytes (its path when only a path is stored)."""
    if image["bytes"] is None:
        return image["path"]
    return hashlib.blake2b(image["bytes"], digest_size=16).hexdigest()


def rows_on_claimed_images(dataset, ranges: dict[str, range]) -> dict[str, dict[int, str]]:
    """{split: {row: reason}}: the rows of each split whose image a split before it in CLAIM_ORDER holds."""
    left_out = {split: {} for split in ranges}
    if len(ranges) == 1:  # a split alone shares no image with another
        return left_out
    holders = {}  # image identity -> (split, row) of the first row that claimed it
    images = dataset.select_columns(["image"])
    for split in (split for split in CLAIM_ORDER if split in ranges):
        rows = range(ranges[split].start, min(ranges[split].stop, len(dataset)))  # rows past the end hold nothing
        for index, row in zip(rows, images.select(rows) if rows else ()):  # select rejects an empty range there
            holder_split, holder_row = holders.setdefault(image_identity(row["image"]), (split, index))
            if holder_split != split:
                left_out[split][index] = f"same image as {holder_split} row {holder_row}, which keeps it"
    return left_out


# ---------------------------------------------------------------- one row, in a worker process
_dataset = _split = _image_dir = _settings = None


def init_worker(dataset, split, image_dir, settings):
    global _dataset, _split, _image_dir, _settings
    _dataset, _split, _image_dir, _settings = dataset, split, image_dir, settings


def init_pool_worker(*args):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    init_worker(*args)


def decode_image(image_field):
    """(RGB image, None), or (None, reason) for bytes PIL cannot read."""
    try:  # the same decoding load_dataset does (EXIF orientation applied), then RGB
        return Image(mode="RGB").decode_example(image_field), None
    except UnidentifiedImageError:  # its message holds a memory address: keep the reason reproducible
        return None, "unreadable image: not in any format PIL can identify"
    except (OSError, ValueError, SyntaxError, DecompressionBombError) as error:  # what PIL raises on bad bytes
        return None, f"unreadable image: {type(error).__name__}: {error}"


def rounded_corners(bbox, bbox_format: str) -> tuple[list[int] | None, str | None]:
    """A source box as whole-pixel corners [x1, y1, x2, y2], rounded outwards so it never shrinks, or (None, reason)."""
    if not valid_box_values(bbox):
        return None, f"bbox is not 4 finite numbers: {bbox!r}"
    box = torch.tensor(bbox, dtype=torch.float64)
    if bbox_format == "xywh":
        box = box_convert(box, "xywh", "xyxy")
    x1, y1, x2, y2 = box.tolist()
    if x2 <= x1 or y2 <= y1:
        return None, f"zero or negative size: bbox {bbox!r} ({bbox_format})"
    return [math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)], None


def clipped_to_image(corners, bbox, bbox_format: str, size) -> tuple[list[int] | None, str | None]:
    """The corners clipped to the image, or (None, reason) when nothing of the box is inside it."""
    x1, y1, x2, y2 = clip_box(corners, size)
    if x2 <= x1 or y2 <= y1:
        return None, f"bbox {bbox!r} ({bbox_format}) lies outside the {size[0]}x{size[1]} image"
    return [x1, y1, x2, y2], None


def convert_row(index: int) -> tuple[int, list[dict], list[dict], dict]:
    """(index, JSONL records (one per query), [], {}) for a good row, (index, [], [skip entry], {}) for a bad one."""
    row = _dataset[index]
    question = row[_settings["query_column"]]
    queries = question if isinstance(question, list) else [question]
    if not queries or not all(isinstance(query, str) and query.strip() for query in queries):
        return index, [], [{"row": index, "reason": f"missing question: {question!r}"}], {}
    bbox_format = _settings["bbox_format"]
    corners, reason = rounded_corners(row["bbox"], bbox_format)  # bad boxes first: no image decoded for them
    image, reason = (None, reason) if reason else decode_image(row["image"])
    box, reason = (None, reason) if reason else clipped_to_image(corners, row["bbox"], bbox_format, image.size)
    if reason:
        return index, [], [{"row": index, "reason": reason}], {}
    name = f"{index:06d}.jpg"
    image.save(os.path.join(_image_dir, name), quality=95)
    response = format_answer(box)
    return index, [{"image": [f"{_split}/{name}"], "query": query, "response": response} for query in queries], [], {}


def most_common_answer(answers: list[str]) -> str:
    """The answer most humans gave, counted after VQA normalisation, in the first spelling given (ties: the first)."""
    counts = Counter(map(normalize_answer, answers))
    return next(answer for answer in answers if counts[normalize_answer(answer)] == max(counts.values()))


def convert_vqa_row(index: int) -> tuple[int, list[dict], list[dict], dict]:
    """--task vqa: one question -> most common answer record per query, keeping every human answer."""
    row = _dataset[index]
    question, answers = row[_settings["query_column"]], row["answer"]
    queries = question if isinstance(question, list) else [question]
    if not queries or not all(isinstance(query, str) and query.strip() for query in queries):
        return index, [], [{"row": index, "reason": f"missing question: {question!r}"}], {}
    if not answers or not all(isinstance(answer, str) and normalize_answer(answer) for answer in answers):
        return index, [], [{"row": index, "reason": f"missing or empty human answers: {answers!r}"}], {}
    image, reason = decode_image(row["image"])
    if reason:
        return index, [], [{"row": index, "reason": reason}], {}
    name = f"{index:06d}.jpg"
    image.save(os.path.join(_image_dir, name), quality=95)
    response = most_common_answer(answers)
    records = [
        {"image": [f"{_split}_vqa/{name}"], "query": f"{query.strip()} {VQA_INSTRUCTION}", "response": response,
         "answers": answers}
        for query in queries
    ]  # fmt: skip
    return index, records, [], {}


def convert_detection_row(index: int) -> tuple[int, list[dict], list[dict], dict]:
    """(index, JSONL records, skip entries (the image's, or one per bad object), {"kept": n, "clipped": n} objects)."""
    row = _dataset[index]
    image, reason = decode_image(row["image"])
    if reason:
        return index, [], [{"row": index, "reason": reason}], {}
    objects, skipped, num_clipped = [], [], 0
    for number, (bbox, category) in enumerate(zip(row["objects"]["bbox"], row["objects"]["category"])):
        corners, reason = rounded_corners(bbox, "xywh")
        box, reason = (None, reason) if reason else clipped_to_image(corners, bbox, "xywh", image.size)
        if reason:
            skipped.append({"row": index, "object": number, "reason": reason})
            continue
        num_clipped += box != corners
        label = _settings["id_names"][category] if _settings["id_names"] else category
        objects.append({"bbox_2d": box, "label": label})
    name = f"{index:06d}.jpg"
    image.save(os.path.join(_image_dir, name), quality=95)
    pairs = detection_records(objects, _settings["names"], _settings, index)
    records = [{"image": [f"{_split}/{name}"], "query": query, "response": response} for query, response in pairs]
    return index, records, skipped, {"kept": len(objects), "clipped": num_clipped}


# ---------------------------------------------------------------- one split
def convert_split(
    dataset, split: str, rows: range, left_out: dict[int, str], save_path: str, row_function, settings: dict,
    num_workers: int,
) -> None:
    """Convert `rows` with `row_function` (convert_row, convert_vqa_row or convert_detection_row), except those in
    `left_out` ({row: reason}), which are only listed in skipped_{split}.jsonl (--task vqa: {split}_vqa.jsonl and
    skipped_{split}_vqa.jsonl, beside the grounding files)."""
    kept = [index for index in rows if index not in left_out]
    stem = f"{split}_vqa" if row_function is convert_vqa_row else split
    jsonl_path = os.path.join(save_path, f"{stem}.jsonl")
    skipped_path = os.path.join(save_path, f"skipped_{stem}.jsonl")
    image_dir = os.path.join(save_path, stem)
    # Everything is written under *.partial names first and renamed at the end, so an interrupted
    # run never leaves a JSONL that looks complete. Leftovers of such a run are cleared here.
    partial_dir = image_dir + ".partial"
    shutil.rmtree(partial_dir, ignore_errors=True)
    os.makedirs(partial_dir)

    worker_args = (dataset, split, partial_dir, settings)
    pool = Pool(num_workers, initializer=init_pool_worker, initargs=worker_args) if num_workers > 1 else None
    if pool is None:
        init_worker(*worker_args)
    results = pool.imap(row_function, kept, chunksize=4) if pool else map(row_function, kept)
    num_written = num_skipped = num_skipped_objects = 0
    object_counts = Counter()  # a detection row's kept and clipped objects
    queries = set()
    try:
        with (
            open(jsonl_path + ".partial", "w", encoding="utf-8") as jsonl,
            open(skipped_path + ".partial", "w", encoding="utf-8") as skipped,
        ):
            for index, reason in left_out.items():
                skipped.write(json.dumps({"row": index, "reason": reason}, ensure_ascii=False) + "\n")
            for index, records, skips, counts in tqdm(results, total=len(kept), desc=f"{split} rows {rows.start}:{rows.stop}"):
                for entry in skips:
                    skipped.write(json.dumps(entry, ensure_ascii=False) + "\n")
                num_skipped_objects += sum("object" in entry for entry in skips)
                num_skipped += any("object" not in entry for entry in skips)
                object_counts.update(counts)
                for record in records:
                    jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
                    queries.add(record["query"])
                num_written += len(records)
    finally:
        if pool:
            pool.terminate()

    # The JSONL appears last: until then a crash leaves no complete-looking output.
    if os.path.exists(jsonl_path):
        os.remove(jsonl_path)
    shutil.rmtree(image_dir, ignore_errors=True)
    os.replace(partial_dir, image_dir)
    os.replace(skipped_path + ".partial", skipped_path)
    os.replace(jsonl_path + ".partial", jsonl_path)
    if num_written > 1 and len(queries) == 1:  # e.g. RefCOCO's instruction column instead of its expressions
        print(f"warning: every {split} row has the query {queries.pop()!r}: is --query_column right?", file=sys.stderr)
    shared = f" and {len(left_out)} rows whose image another split keeps" if left_out else ""
    print(
        f"{split}: {num_written} rows (from {len(kept) - num_skipped} dataset rows) -> {jsonl_path}; "
        f"skipped {num_skipped} bad rows{shared} (listed in {skipped_path})"
    )
    if row_function is convert_detection_row:
        print(
            f"{split} objects: kept {object_counts['kept']}, of which {object_counts['clipped']} clipped to their "
            f"image; skipped {num_skipped_objects} bad objects (listed in {skipped_path})"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True, help="local dir (parquet shards or save_to_disk) or dataset id")
    parser.add_argument("--save_path", required=True, help="output dir for {split}.jsonl and images")
    parser.add_argument("--type", choices=[*SPLITS, "all"], default="all", help="which split(s) to write")
    parser.add_argument("--train_range", type=parse_range, default="0:3000", help="dataset rows START:END of train")
    parser.add_argument("--val_range", type=parse_range, default="3100:3200", help="dataset rows START:END of val")
    parser.add_argument("--test_range", type=parse_range, default="3000:3100", help="dataset rows START:END of test")
    parser.add_argument("--bbox_format", choices=["xywh", "xyxy"], default="xywh", help="how the source stores bbox")
    parser.add_argument("--split", default="train", help="the source split to read (RefCOCO: val, test, testA, testB)")
    parser.add_argument("--query_column", default="question", help="column of the query; a list gives a row per item")
    parser.add_argument("--hub", choices=["huggingface", "modelscope"], default="huggingface", help="for dataset ids")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="processes saving images")
    parser.add_argument(
        "--task", choices=["grounding", "vqa", "detect"], default="grounding",
        help="grounding: question -> box (the default); vqa: question -> most common human answer, *_vqa files; "
        "detect: a detection source, every object of a category as a list",
    )  # fmt: skip
    detect = parser.add_argument_group("--task detect: every object of a category, answered as a list")
    detect.add_argument("--image_dir", help="COCO: the folder its file_names are relative to (default: the JSON's)")
    detect.add_argument("--categories", help="names of category ids: one a line (line 1 is id 0), or JSON list/object")
    detect.add_argument("--query_style", choices=[PER_CATEGORY, ALL_CATEGORIES], default=PER_CATEGORY,
                        help="a row per category present, or one row asking for all of an image's categories")  # fmt: skip
    detect.add_argument("--groups", help='JSON {"red shape": ["red circle", ...]}: also a row per group present')
    detect.add_argument("--negatives", type=float, default=0.0, help="rows asking for an absent category, per row")
    detect.add_argument("--seed", type=int, default=0, help="which absent categories the negatives ask for")
    args = parser.parse_args(argv)

    if args.task == "detect":
        dataset, settings = load_detection_source(args)
        row_function = convert_detection_row
    else:
        dataset = load_source(args.data_path, args.hub, args.split)
        missing = {"image", args.query_column, "bbox" if args.task == "grounding" else "answer"} - set(dataset.column_names)
        if missing:
            raise SystemExit(f"{args.data_path}: missing columns {sorted(missing)}; found {dataset.column_names}")
        row_function = convert_row if args.task == "grounding" else convert_vqa_row
        settings = {"bbox_format": args.bbox_format, "query_column": args.query_column}
    if isinstance(dataset.features["image"], Image):
        dataset = dataset.cast_column("image", Image(decode=False))  # workers decode, in parallel

    splits = SPLITS if args.type == "all" else (args.type,)
    given = {"train": args.train_range, "val": args.val_range, "test": args.test_range}
    ranges = {split: range(start, len(dataset) if end is None else end) for split, (start, end) in given.items()}
    # All ranges are rows of one split; a held-out split (RefCOCO val) converted alone is never trained on.
    same_split_trains = args.type == "all" or args.split == "train"
    for first, second in itertools.combinations(SPLITS, 2) if same_split_trains else ():
        a, b = ranges[first], ranges[second]
        if a.start < b.stop and b.start < a.stop:
            raise SystemExit(
                f"--{first}_range {a.start}:{a.stop} overlaps --{second}_range {b.start}:{b.stop}: "
                "the same rows would be in two splits. Set both ranges."
            )
    for split in splits:
        if not 0 <= ranges[split].start < ranges[split].stop <= len(dataset):
            raise SystemExit(
                f"--{split}_range {ranges[split].start}:{ranges[split].stop} is not inside the {len(dataset)} rows "
                f"of split {args.split}: pass --{split}_range START:END with END <= {len(dataset)}, or START: "
                f"(e.g. 0:) to read to the end"
            )
    # The held-out ranges claim their images even when not written now, so converting one split at a time
    # gives the same files; only the splits up to the last one written in CLAIM_ORDER need reading.
    last = max(CLAIM_ORDER.index(split) for split in splits)
    claiming = CLAIM_ORDER[: last + 1] if same_split_trains else splits
    left_out = rows_on_claimed_images(dataset, {split: ranges[split] for split in claiming})

    os.makedirs(args.save_path, exist_ok=True)
    try:
        for split in splits:
            convert_split(
                dataset, split, ranges[split], left_out[split], args.save_path, row_function, settings, args.num_workers
            )
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the split in progress left only *.partial files, cleared by a rerun") from None


if __name__ == "__main__":
    main()
