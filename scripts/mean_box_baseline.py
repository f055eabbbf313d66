"""The trivial baseline a grounding model must beat: always answer the training set's mean box.

The mean is taken over boxes normalised by their image's size, then scaled to each test image, and
scored exactly as infer.py scores a model (scoring.py: same metrics.json keys), so the figures sit side by side.

    python scripts/mean_box_baseline.py --train_dataset_name data/train.jsonl \\
        --test_dataset_name data/test.jsonl --output_dir outputs/mean_box
"""

import argparse
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scoring import evaluate, read_true_boxes, summary_table  # noqa: E402
from utils import load_sft_jsonl, scale_box, write_json_atomic, write_jsonl_atomic  # noqa: E402

MODEL_NAME = "mean box"


def boxes_and_sizes(path: str):
    """(rows, boxes in original pixels, image (width, height)) of a converter JSONL."""
    rows = load_sft_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: no samples")
    boxes = read_true_boxes(path, rows)
    sizes = []
    for row in rows:
        with Image.open(row["image"][0]) as image:  # reads the header only
            sizes.append(image.size)
    return rows, boxes, sizes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_dataset_name", required=True)
    parser.add_argument("--test_dataset_name", required=True)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()

    try:
        _, train_boxes, train_sizes = boxes_and_sizes(args.train_dataset_name)
        rows, test_boxes, test_sizes = boxes_and_sizes(args.test_dataset_name)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from error
    unit_boxes = [scale_box(box, size, (1, 1)) for box, size in zip(train_boxes, train_sizes)]
    mean_box = [sum(values) / len(values) for values in zip(*unit_boxes)]
    print(f"mean training box, as a fraction of the image: {[round(v, 3) for v in mean_box]}")

    predictions = [
        {"raw_output": "", "pred_bbox": scale_box(mean_box, (1, 1), size), "image_size": list(size), "error": None}
        for size in test_sizes
    ]
    records, metrics = evaluate(rows, test_boxes, predictions)
    metrics = {"model": MODEL_NAME, "test_dataset": args.test_dataset_name, **metrics}
    os.makedirs(args.output_dir, exist_ok=True)
    write_jsonl_atomic(os.path.join(args.output_dir, "predictions.jsonl"), records)
    write_json_atomic(os.path.join(args.output_dir, "metrics.json"), metrics)
    print(summary_table(MODEL_NAME, metrics))


if __name__ == "__main__":
    main()
