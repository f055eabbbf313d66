"""Build a synthetic dataset with TextVQA_GT_bbox's schema, offline.

Each image holds one target object (a colour + shape named by the question) among distractors
that differ in colour or shape, so the answer can be found from the image alone. Columns match
the real dataset: image, question, answer (list of str), dataset_id (str), bbox as
[x, y, width, height] floats in original pixels. Written in the Hub layout
(DIR/data/train-00000-of-00001.parquet) that `datasets.load_dataset(DIR, split="train")` reads.

With --schema refcoco the same images get lmms-lab/RefCOCO's columns instead: question_id, image,
question (the same instruction on every row), answer (the referring expressions), segmentation,
bbox (COCO [x, y, width, height]), iscrowd, file_name, in DIR/data/{--split}-00000-of-00001.parquet.

With --general_questions the images hold one to three objects of one colour and one shape, and each question
is about the image as a whole, answered by a word (ten identical human answers): "what colour are the
objects?", "what shape are the objects?" or "how many objects are there?". Converted with
`convert2sft_format.py --task vqa`, this is the general task that scripts/retention_study.sh teaches first.

With --schema coco or objects, each image holds 1 to --max_objects named shapes, with repeated categories
(three red circles) and others around them, for `convert2sft_format.py --task detect`: coco writes
DIR/instances.json and DIR/images/, objects writes parquet rows with image and objects {bbox: [[x, y, w, h],
...], category: ["red circle", ...]}; both write DIR/groups.json, the attribute queries ("red shape": every
red one, "triangle": every colour) for the converter's --groups.

    python scripts/make_synthetic_data.py --output_dir data/synthetic_textvqa --num_samples 2000
    python scripts/make_synthetic_data.py --output_dir data/synthetic_refcoco --schema refcoco --split val
    python scripts/make_synthetic_data.py --output_dir data/synthetic_coco --schema coco --max_objects 4
"""

import argparse
import io
import math
import os
import random
import sys

from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import write_json_atomic  # noqa: E402

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20),
    "purple": (140, 40, 170), "orange": (250, 130, 10), "cyan": (20, 200, 210), "black": (15, 15, 15),
    "pink": (250, 120, 180), "brown": (120, 70, 20), "white": (250, 250, 250), "gray": (128, 128, 128),
}  # fmt: skip
SHAPES = ["square", "circle", "triangle", "diamond", "cross", "bar"]
FEATURES = Features(
    {
        "image": Image(),
        "question": Value("string"),
        "answer": List(Value("string")),
        "dataset_id": Value("string"),
        "bbox": List(Value("float64")),
    }
)
REFCOCO_FEATURES = Features(
    {
        "question_id": Value("string"),
        "image": Image(),
        "question": Value("string"),
        "answer": List(Value("string")),
        "segmentation": List(Value("float32")),
        "bbox": List(Value("float32")),
        "iscrowd": Value("int8"),
        "file_name": Value("string"),
    }
)
OBJECTS_FEATURES = Features(
    {"image": Image(), "objects": {"bbox": List(List(Value("float64"))), "category": List(Value("string"))}}
)
# lmms-lab/RefCOCO's question column is an instruction for captioning; the expressions are the answers.
REFCOCO_QUESTION = "Please carefully observe the area circled in the image and come up with a caption for the area."


def to_refcoco(sample: dict) -> dict:
    """A TextVQA-schema sample in lmms-lab/RefCOCO's columns, with two referring expressions."""
    color, shape = sample["answer"][0].split(" ")
    x, y, width, height = sample["bbox"]
    return {
        "question_id": sample["dataset_id"],
        "image": sample["image"],
        "question": REFCOCO_QUESTION,
        "answer": [f"{color} {shape}", f"the {shape} that is {color}"],
        "segmentation": [x, y, x + width, y, x + width, y + height, x, y + height],
        "bbox": sample["bbox"],
        "iscrowd": 0,
        "file_name": f"COCO_synthetic_{int(sample['dataset_id']):012d}.jpg",
    }


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    """Fill `shape` so it touches all four sides of `box` (x1, y1, x2, y2, pixel edges)."""
    x1, y1, x2, y2 = box
    last_x, last_y = x2 - 1, y2 - 1  # PIL's coordinates are inclusive pixel indices
    middle_x, middle_y = (x1 + last_x) / 2, (y1 + last_y) / 2
    if shape == "square":
        draw.rectangle((x1, y1, last_x, last_y), fill=color)
    elif shape == "circle":
        draw.ellipse((x1, y1, last_x, last_y), fill=color)
    elif shape == "triangle":
        draw.polygon([(middle_x, y1), (last_x, last_y), (x1, last_y)], fill=color)
    elif shape == "diamond":
        draw.polygon([(middle_x, y1), (last_x, middle_y), (middle_x, last_y), (x1, middle_y)], fill=color)
    elif shape == "cross":
        third_w, third_h = (x2 - x1) / 3, (y2 - y1) / 3
        draw.rectangle((x1 + third_w, y1, x2 - third_w - 1, last_y), fill=color)
        draw.rectangle((x1, y1 + third_h, last_x, y2 - third_h - 1), fill=color)
    elif shape == "bar":
        draw.rectangle((x1, y1, last_x, last_y), fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def random_box(rng: random.Random, width: int, height: int, shape: str, min_frac: float, max_frac: float, sizes: str):
    """A box for `shape`, its side min_frac..max_frac of the short side, drawn uniformly in side or in log(side)."""
    if sizes == "log":
        fraction = math.exp(rng.uniform(math.log(min_frac), math.log(max_frac)))
    else:
        fraction = rng.uniform(min_frac, max_frac)
    side = fraction * min(width, height)
    box_w, box_h = side, side
    if shape == "bar":  # long and thin, in either orientation
        box_w, box_h = (side * 2.5, side * 0.5) if rng.random() < 0.5 else (side * 0.5, side * 2.5)
    box_w, box_h = max(6, min(int(box_w), width - 2)), max(6, min(int(box_h), height - 2))
    x1 = rng.randint(0, width - box_w)
    y1 = rng.randint(0, height - box_h)
    return (x1, y1, x1 + box_w, y1 + box_h)


def overlaps(box, others, margin: int = 4) -> bool:
    return any(
        box[0] < o[2] + margin and o[0] < box[2] + margin and box[1] < o[3] + margin and o[1] < box[3] + margin
        for o in others
    )


def draw_texture(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], background, texture) -> None:
    """Cover the background with `texture` in shades a little darker than it, never a named colour."""
    width, height = size
    if texture == "mixed":
        texture = rng.choice(["plain", "noise", "stripes"])
    if texture == "noise":  # blotches of a few pixels, so they survive the resize to the model's side
        cell = max(2, min(width, height) // 40)
        for y in range(0, height, cell):
            for x in range(0, width, cell):
                shade = rng.randint(0, 45)
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=tuple(c - shade for c in background))
    elif texture == "stripes":  # parallel bands at a random angle and period
        period = rng.randint(max(4, min(width, height) // 30), max(8, min(width, height) // 6))
        shade = tuple(c - rng.randint(25, 50) for c in background)
        slope = rng.uniform(-1.5, 1.5)
        rise = int(slope * width)  # the offsets must cover every row at both ends of each line
        for offset in range(min(0, -rise) - period, height + max(0, -rise) + period, period):
            draw.line([(0, offset), (width, offset + slope * width)], fill=shade, width=max(1, period // 2))


def new_canvas(rng: random.Random, args):
    """A background image and its drawing context, of a random size and orientation within --min/max_side."""
    # Wide range of sizes and aspect ratios so every resize path of the collator is exercised.
    long_side = rng.randint(args.min_side, args.max_side)
    short_side = max(args.min_side, int(long_side * rng.uniform(0.5, 1.0)))
    width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = PILImage.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    if args.texture != "plain":
        draw_texture(draw, rng, (width, height), background, args.texture)
    if args.clutter:  # thin random lines in muted colours, never a named colour
        for _ in range(rng.randint(5, 20)):
            points = [(rng.randint(0, width), rng.randint(0, height)) for _ in range(2)]
            draw.line(points, fill=tuple(rng.randint(150, 200) for _ in range(3)), width=rng.randint(1, 3))
    return image, draw


def make_sample(rng: random.Random, index: int, args) -> dict:
    image, draw = new_canvas(rng, args)
    width, height = image.size
    colors, shapes = args.colors, args.shapes
    target = (rng.choice(colors), rng.choice(shapes))
    target_box = random_box(rng, width, height, target[1], args.min_object, args.max_object, args.sizes)
    placed = [target_box]
    for _ in range(rng.randint(0, args.max_distractors)):
        distractor = (rng.choice(colors), rng.choice(shapes))
        if distractor == target:
            continue
        for _attempt in range(20):
            box = random_box(rng, width, height, distractor[1], args.min_object, args.max_object, args.sizes)
            if not overlaps(box, placed):
                draw_shape(draw, distractor[1], box, COLORS[distractor[0]])
                placed.append(box)
                break
    draw_shape(draw, target[1], target_box, COLORS[target[0]])

    x1, y1, x2, y2 = target_box
    name = f"{target[0]} {target[1]}"
    return {
        "image": image,
        "question": f"where is the {name}?",
        "answer": [name] * 10,
        "dataset_id": str(index),
        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
    }


def make_general_sample(rng: random.Random, index: int, args) -> dict:
    """One to three objects of one colour and shape, and a colour, shape or count question about them all (no
    question names one object: the tiny model learns these within minutes, see scripts/retention_study.sh)."""
    width = height = args.max_side  # fixed size: the general task is about what, not where
    image = PILImage.new("RGB", (width, height), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    count = rng.randint(1, 3)
    color, shape = rng.choice(args.colors), rng.choice(args.shapes)
    boxes = []
    for _attempt in range(1000):
        box = random_box(rng, width, height, shape, args.min_object, args.max_object, args.sizes)
        boxes += [] if overlaps(box, boxes) else [box]
        if len(boxes) == count:
            break
    else:
        raise SystemExit(f"sample {index}: {count} objects of side up to --max_object {args.max_object} do not fit")
    for box in boxes:
        draw_shape(draw, shape, box, COLORS[color])
    kind = rng.choice(["colour", "shape", "count"])
    if kind == "colour":
        question, answer = "what colour are the objects?", color
    elif kind == "shape":
        question, answer = "what shape are the objects?", shape
    else:
        question, answer = "how many objects are there?", str(count)
    x1, y1, x2, y2 = boxes[0]
    return {
        "image": image,
        "question": question,
        "answer": [answer] * 10,
        "dataset_id": str(index),
        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],  # the object asked about (any, for a count)
    }
# ---------------------------------------------------------------- multi-object mode (--schema coco / objects)
def make_detection_sample(rng: random.Random, args) -> tuple[PILImage.Image, list[dict]]:
    """An image with 1 to --max_objects named shapes, none overlapping, and its objects [{"bbox": [x, y, w, h],
    "category": "red circle"}]. After the first, each object repeats a category already drawn with probability
    --repeat (three red circles), else is any category: the distractors of the others' queries."""
    image, draw = new_canvas(rng, args)
    width, height = image.size
    categories = [(color, shape) for color in args.colors for shape in args.shapes]
    objects, placed = [], []
    for _ in range(rng.randint(1, args.max_objects)):
        drawn = [item["category"] for item in objects]
        color, shape = rng.choice(drawn).split(" ") if drawn and rng.random() < args.repeat else rng.choice(categories)
        for _attempt in range(20):
            box = random_box(rng, width, height, shape, args.min_object, args.max_object, args.sizes)
            if not overlaps(box, placed):
                draw_shape(draw, shape, box, COLORS[color])
                placed.append(box)
                x1, y1, x2, y2 = box
                objects.append({"bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "category": f"{color} {shape}"})
                break
    return image, objects


def category_groups(colors, shapes) -> dict[str, list[str]]:
    """The attribute queries, as the converter's --groups: "red shape" (every red one), "triangle" (every colour)."""
    groups = {f"{color} shape": [f"{color} {shape}" for shape in shapes] for color in colors}
    groups.update({shape: [f"{color} {shape}" for color in colors] for shape in shapes})
    return groups


def write_detection_source(rng: random.Random, args) -> None:
    """COCO (DIR/instances.json, DIR/images/) or parquet rows with objects (DIR/data/{split}-...), plus
    DIR/groups.json; images are JPEG, written as they are drawn (thousands of large images fit no memory)."""
    names = [f"{color} {shape}" for color in args.colors for shape in args.shapes]
    images, annotations, rows = [], [], []
    os.makedirs(os.path.join(args.output_dir, "images" if args.schema == "coco" else "data"), exist_ok=True)
    for index in tqdm(range(args.num_samples), desc="drawing images"):
        image, objects = make_detection_sample(rng, args)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        if args.schema == "objects":
            rows.append({"image": {"bytes": buffer.getvalue(), "path": None},
                         "objects": {"bbox": [o["bbox"] for o in objects], "category": [o["category"] for o in objects]}})  # fmt: skip
            continue
        file_name = f"images/{index:06d}.jpg"
        with open(os.path.join(args.output_dir, file_name), "wb") as f:
            f.write(buffer.getvalue())
        images.append({"id": index, "file_name": file_name, "width": image.width, "height": image.height})
        for item in objects:
            x, y, box_w, box_h = item["bbox"]
            annotations.append({"id": len(annotations) + 1, "image_id": index, "category_id": names.index(item["category"]) + 1,
                                "bbox": item["bbox"], "area": box_w * box_h, "iscrowd": 0})  # fmt: skip
    if args.schema == "objects":
        Dataset.from_list(rows, features=OBJECTS_FEATURES).to_parquet(
            os.path.join(args.output_dir, "data", f"{args.split}-00000-of-00001.parquet")
        )
    else:
        categories = [{"id": number, "name": name, "supercategory": "shape"} for number, name in enumerate(names, start=1)]
        coco = {"images": images, "annotations": annotations, "categories": categories}
        write_json_atomic(os.path.join(args.output_dir, "instances.json"), coco)
    write_json_atomic(os.path.join(args.output_dir, "groups.json"), category_groups(args.colors, args.shapes))
    print(f"{args.num_samples} synthetic multi-object images ({args.schema}) written to {args.output_dir}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_side", type=int, default=150)
    parser.add_argument("--max_side", type=int, default=1300)
    parser.add_argument("--colors", nargs="+", default=["red", "green", "blue", "yellow"], choices=sorted(COLORS))
    parser.add_argument("--shapes", nargs="+", default=["square", "circle", "triangle"], choices=SHAPES)
    parser.add_argument("--max_distractors", type=int, default=2)
    parser.add_argument("--min_object", type=float, default=0.15, help="object side as a fraction of the short side")
    parser.add_argument("--max_object", type=float, default=0.4)
    parser.add_argument(
        "--sizes", choices=["uniform", "log"], default="uniform",
        help="how object sides are drawn: uniform, or uniform in log scale (every factor of size equally often, "
        "so more small objects: a quarter under 0.15 with 0.1-0.5, against an eighth)",
    )  # fmt: skip
    parser.add_argument("--clutter", action="store_true", help="draw random lines on the background")
    parser.add_argument(
        "--texture", default="plain", choices=["plain", "noise", "stripes", "mixed"],
        help="background texture in muted shades; mixed: each image draws plain, noise or stripes",
    )  # fmt: skip
    parser.add_argument(
        "--general_questions", action="store_true",
        help="colour, shape and count questions with one-word answers on square --max_side images (--task vqa)",
    )  # fmt: skip
    parser.add_argument(
        "--schema", choices=["textvqa", "refcoco", "coco", "objects"], default="textvqa",
        help="which dataset's columns; coco (instances.json) and objects (parquet) draw several objects per image",
    )  # fmt: skip
    parser.add_argument("--max_objects", type=int, default=4, help="coco/objects: at most this many objects an image")
    parser.add_argument("--repeat", type=float, default=0.5, help="coco/objects: chance an object repeats a category")
    parser.add_argument("--split", default="train", help="the split the parquet file is named after")
    args = parser.parse_args()
    if len(args.colors) * len(args.shapes) < 2:
        parser.error("need at least two colour/shape combinations so distractors can differ from the target")

    rng = random.Random(args.seed)
    if args.schema in ("coco", "objects"):
        write_detection_source(rng, args)
        return
    make = make_general_sample if args.general_questions else make_sample
    samples = [make(rng, index, args) for index in tqdm(range(args.num_samples), desc="drawing images")]
    if args.schema == "refcoco":
        dataset = Dataset.from_list([to_refcoco(sample) for sample in samples], features=REFCOCO_FEATURES)
    else:
        dataset = Dataset.from_list(samples, features=FEATURES)
    os.makedirs(os.path.join(args.output_dir, "data"), exist_ok=True)
    dataset.to_parquet(os.path.join(args.output_dir, "data", f"{args.split}-00000-of-00001.parquet"))
    print(f"{len(dataset)} synthetic {args.schema}-schema samples ({args.split} split) written to {args.output_dir}")


if __name__ == "__main__":
    main()
