"""The sources `convert2sft_format.py` reads, and the grounding rows made from one image of a detection source.

`load_source`: a TextVQA-schema dataset (or any parquet source) from a local folder (Hub/ModelScope parquet
layout or datasets.save_to_disk), a Hub id or a ModelScope id.

Detection sources (--task detect), two forms read into one: a Dataset with an `image` column (encoded, not
decoded) and `objects` {bbox: [[x, y, w, h], ...] in original pixels, category: [...]}, one row per image.
  - COCO: an instances.json (images, annotations, categories) plus the folder of its images;
  - parquet rows (Hub layout, save_to_disk or a dataset id) with `image` and `objects`, whose category is a
    name, or an id named by --categories FILE (or by the column's own ClassLabel names).
Each image then gives rows whose answer is Qwen's list, `[{"bbox_2d": [x1, y1, x2, y2], "label": name}, ...]`
in original pixels, asked with Qwen's cookbook prompt (`detection_query`).
"""

import glob
import json
import os
import random

from datasets import ClassLabel, Dataset, Features, Image, List, Value, load_dataset, load_from_disk

from answers import format_boxes_answer

PER_CATEGORY, ALL_CATEGORIES = "per_category", "all_categories"
DETECTION_FEATURES = Features(
    {"image": Image(decode=False), "objects": {"bbox": List(List(Value("float64"))), "category": List(Value("string"))}}
)


def load_source(data_path: str, hub: str, split: str):
    """One split of the dataset as a Dataset, from any of the layouts in convert2sft_format.py's docstring."""
    if os.path.isdir(data_path):
        return load_local(data_path, split)
    if os.path.isabs(data_path) or data_path.startswith(".") or data_path.count("/") != 1:
        raise SystemExit(f"--data_path {data_path}: no such directory, and not a dataset id like owner/name")
    if hub == "modelscope":
        from modelscope import dataset_snapshot_download

        return load_local(dataset_snapshot_download(data_path), split)
    return load_dataset(data_path, split=split)


def load_local(directory: str, split: str):
    if any(os.path.isfile(os.path.join(directory, name)) for name in ("state.json", "dataset_dict.json")):
        dataset = load_from_disk(directory)
        if isinstance(dataset, dict):  # a saved DatasetDict
            if split not in dataset:
                raise SystemExit(f"{directory}: saved DatasetDict has splits {list(dataset)}, not --split {split}")
            dataset = dataset[split]
        return dataset
    if not glob.glob(os.path.join(directory, "**", "*.parquet"), recursive=True):
        raise SystemExit(
            f"{directory}: no *.parquet shards and no save_to_disk files (state.json) found. Expected the "
            "Hub/ModelScope layout (data/train-*.parquet) or a datasets.save_to_disk directory."
        )
    # The parquet builder reads the shards (and their embedded features) directly, so a legacy
    # dataset_infos.json beside them, e.g. the ModelScope uploader's whose Values lack "dtype"
    # (TypeError in load_dataset(dir) as of datasets 5.2), is never read nor touched.
    # Hub shards are named data/{split}-00000-of-00004.parquet, which names any split (testA too).
    try:
        return load_dataset("parquet", data_dir=directory, split=split)
    except ValueError as error:  # "Unknown split ..." names the splits found
        raise SystemExit(f"{directory}: no --split {split} in the parquet shards: {error}") from None


def detection_query(names) -> str:
    """Qwen's cookbook prompt for every instance of one or more categories."""
    return (
        f'Locate every instance that belongs to the following categories: "{", ".join(names)}". '
        "Report bbox coordinates in JSON format."
    )


def load_coco(instances_path: str, image_dir: str) -> tuple[Dataset, list[str], int]:
    """(one row per image in the file's order, the category names sorted, crowd annotations left out)."""
    try:
        with open(instances_path, encoding="utf-8") as f:
            coco = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"{instances_path}: not a readable COCO instances JSON file: {error}") from None
    missing = {"images", "annotations", "categories"} - set(coco if isinstance(coco, dict) else ())
    if missing:
        raise SystemExit(f"{instances_path}: a COCO instances file needs the keys {sorted(missing)} (missing)")
    try:
        names = {category["id"]: category["name"] for category in coco["categories"]}
        rows = {image["id"]: {"path": os.path.join(image_dir, image["file_name"]), "bbox": [], "category": []}
                for image in coco["images"]}  # fmt: skip
    except (KeyError, TypeError) as error:
        raise SystemExit(f"{instances_path}: every category needs id and name, every image id and file_name ({error!r})")
    num_crowd = 0
    for number, annotation in enumerate(coco["annotations"]):
        where = f"{instances_path}: annotations[{number}] (id {annotation.get('id')})"
        if annotation.get("image_id") not in rows:
            raise SystemExit(f"{where}: image_id {annotation.get('image_id')!r} is not in images")
        if annotation.get("category_id") not in names:
            raise SystemExit(f"{where}: category_id {annotation.get('category_id')!r} is not in categories")
        if annotation.get("iscrowd"):  # a crowd region (a group of people) is no instance box: left out, counted
            num_crowd += 1
            continue
        row = rows[annotation["image_id"]]
        box = annotation.get("bbox")  # kept as given: a bad box is skipped and counted at conversion, per object
        row["bbox"].append(box if isinstance(box, list) else [])
        row["category"].append(names[annotation["category_id"]])
    records = [{"image": {"path": row["path"], "bytes": None}, "objects": {"bbox": row["bbox"], "category": row["category"]}}
               for row in rows.values()]  # fmt: skip
    return Dataset.from_list(records, features=DETECTION_FEATURES), sorted(set(names.values())), num_crowd


def read_categories_file(path: str) -> dict[int, str]:
    """{id: name} from a text file (one name a line, line 1 names id 0) or JSON (a list, or {"id": "name"})."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}: not valid JSON ({error}); give a list of names or {{\"id\": \"name\"}}") from None
        pairs = enumerate(value) if isinstance(value, list) else value.items() if isinstance(value, dict) else None
        if pairs is None:
            raise SystemExit(f"{path}: expected a JSON list of names or an object {{\"id\": \"name\"}}")
        names = {}
        for key, name in pairs:
            if not str(key).lstrip("-").isdigit() or not isinstance(name, str) or not name.strip():
                raise SystemExit(f"{path}: entry {key!r}: {name!r} is not an integer id with a non-empty name")
            names[int(key)] = name.strip()
        return names
    names = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            raise SystemExit(f"{path}:{number}: empty line; every line names one category (line 1 is id 0)")
        names[number - 1] = line.strip()
    return names


def objects_source(dataset: Dataset, data_path: str, categories_path: str | None) -> tuple[dict | None, list[str]]:
    """({id: name} when categories are ids, else None; every category name) for a parquet source with `objects`."""
    if "objects" not in dataset.column_names or "image" not in dataset.column_names:
        raise SystemExit(f"{data_path}: --task detect needs columns image and objects; found {dataset.column_names}")
    objects = dataset.features["objects"]
    if not isinstance(objects, dict) or not {"bbox", "category"} <= set(objects):
        raise SystemExit(f"{data_path}: objects must hold bbox ([[x, y, w, h], ...]) and category; found {objects}")
    category = objects["category"]
    category = getattr(category, "feature", category)  # List(...) of the values
    if categories_path:
        id_names = read_categories_file(categories_path)
    elif isinstance(category, ClassLabel):
        id_names = dict(enumerate(category.names))
    elif isinstance(category, Value) and category.dtype == "string":
        return None, sorted({name for row in dataset["objects"] for name in row["category"]})
    else:
        raise SystemExit(
            f"{data_path}: objects.category holds ids ({category}): pass --categories FILE naming them "
            "(one name a line, line 1 is id 0; or JSON)"
        )
    for row, value in enumerate(dataset["objects"]):  # checked here, before any worker starts
        unknown = sorted(set(value["category"]) - set(id_names))
        if unknown:
            source = categories_path or "the column's ClassLabel names"
            raise SystemExit(f"{data_path}: row {row}: category ids {unknown} are not named in {source}")
    return id_names, sorted(set(id_names.values()))


def read_groups(path: str, names: list[str]) -> dict[str, list[str]]:
    """{query name: [its categories]} from a JSON file, e.g. {"red shape": ["red circle", "red square"]}."""
    try:
        with open(path, encoding="utf-8") as f:
            groups = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"{path}: not a readable JSON file of {{group: [category, ...]}}: {error}") from None
    if not isinstance(groups, dict):
        raise SystemExit(f"{path}: expected a JSON object {{group: [category, ...]}}")
    for group, members in groups.items():
        unknown = set(members) - set(names) if isinstance(members, list) else {repr(members)}
        if unknown:
            raise SystemExit(f"{path}: group {group!r} names {sorted(unknown)}, not categories of the source")
    return groups


def load_detection_source(args) -> tuple[Dataset, dict]:
    """The converter's detection dataset (one row per image) and the settings of its rows, from its arguments;
    a parquet source is read by load_source, as the TextVQA path does."""
    if args.negatives < 0:
        raise SystemExit(f"--negatives {args.negatives}: give a ratio >= 0 (0.5: one negative row per two rows)")
    if args.groups and args.query_style != PER_CATEGORY:
        raise SystemExit(f"--groups asks a row per group: it needs --query_style {PER_CATEGORY}")
    if args.data_path.endswith(".json"):
        if not os.path.isfile(args.data_path):
            raise SystemExit(f"--data_path {args.data_path}: no such COCO instances file")
        if args.categories:
            raise SystemExit(f"--categories names the ids of parquet sources; {args.data_path} names its own categories")
        image_dir = args.image_dir or os.path.dirname(os.path.abspath(args.data_path))
        dataset, names, num_crowd = load_coco(args.data_path, image_dir)
        id_names = None
        if num_crowd:
            print(f"left out {num_crowd} crowd annotations (iscrowd=1): regions of several objects, not instances")
    else:
        dataset = load_source(args.data_path, args.hub, args.split)
        id_names, names = objects_source(dataset, args.data_path, args.categories)
    groups = read_groups(args.groups, names) if args.groups else {}
    settings = {"names": names, "id_names": id_names, "query_style": args.query_style, "negatives": args.negatives,
                "seed": args.seed, "groups": groups}  # fmt: skip
    return dataset, settings


def detection_records(objects, names, settings, row_index) -> list[tuple[str, str]]:
    """(query, response) pairs for one image's kept objects [{"bbox_2d", "label"}].

    per_category: one row per category present (every instance of it), one per group present (the instances
    of its categories, each labelled with its own category); all_categories: one row naming every category
    present. Then --negatives R: R rows per positive row (the fraction by a coin seeded with the row), each
    asking for a category (or group) absent from the image, answered "[]".
    """
    # Reading order (top, then left) is the order Qwen writes lists in, and a fixed order is learnable.
    objects = sorted(objects, key=lambda item: (item["bbox_2d"][1], item["bbox_2d"][0]))
    present = list(dict.fromkeys(item["label"] for item in objects))
    pairs = []
    if settings["query_style"] == ALL_CATEGORIES and objects:
        pairs.append((detection_query(present), format_boxes_answer(objects)))
    elif settings["query_style"] == PER_CATEGORY:
        for name in present:
            pairs.append((detection_query([name]), format_boxes_answer([o for o in objects if o["label"] == name])))
        for group, members in settings["groups"].items():
            matching = [o for o in objects if o["label"] in members]
            if matching:
                pairs.append((detection_query([group]), format_boxes_answer(matching)))
    absent = [name for name in names if name not in present]
    absent += [group for group, members in settings["groups"].items() if not set(members) & set(present)]
    rng = random.Random(settings["seed"] * 1_000_003 + row_index)  # the same rows whatever the worker count
    wanted = settings["negatives"] * max(len(pairs), 1)
    count = int(wanted) + (rng.random() < wanted - int(wanted))
    for name in rng.sample(absent, min(count, len(absent))):
        pairs.append((detection_query([name]), "[]"))
    return pairs
