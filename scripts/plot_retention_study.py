"""Bar chart of scripts/retention_study.sh: the general task's VQA accuracy and grounding Acc@0.5 of each model.

    python scripts/plot_retention_study.py --output docs/retention_study.png \\
        "before grounding SFT=outputs/retention/eval/base" "grounding only=outputs/retention/eval/grounding_only"

Each argument is LABEL=DIR, DIR an infer.py --output_dir whose metrics.json holds both tasks (a mixed test file).
"""

import argparse
import json
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pictures import chart_axes  # noqa: E402
from utils import atomic_path  # noqa: E402

BARS = {"general task: VQA accuracy": ("vqa_accuracy", (67, 147, 195)), "grounding: Acc@0.5": ("acc@0.5", (214, 96, 77))}


def draw_chart(results: dict[str, dict]) -> Image.Image:
    """Grouped bars: one group per model, one bar per task, the figure written on each bar."""
    width, height, bottom, top, left = 640, 360, 300, 70, 50
    title = "What grounding SFT keeps of the general task (tiny model, CPU)"
    chart, draw, font = chart_axes((width, height), (left, top, bottom), title, 13)
    group_width = (width - left - 20) / len(results)
    bar_width = group_width / (len(BARS) + 1)
    for group, (label, metrics) in enumerate(results.items()):
        x = left + 10 + group * group_width
        for key, color in BARS.values():
            value = metrics.get(key)
            bar_height = (value or 0.0) * (bottom - top)
            draw.rectangle((x, bottom - bar_height, x + bar_width - 4, bottom), color)
            draw.text((x + 2, bottom - bar_height - 15), "-" if value is None else f"{value:.2f}", "black", font)
            x += bar_width
        for line, words in enumerate(label.split(", ")):  # ", " starts a new line under the group
            draw.text((left + 10 + group * group_width, bottom + 8 + 16 * line), words, "black", font)
    for column, (name, (_, color)) in enumerate(BARS.items()):
        draw.rectangle((left + column * 220, 30, left + 12 + column * 220, 42), color)
        draw.text((left + 18 + column * 220, 28), name, "black", font)
    return chart


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=DIR", help="a bar group's label and its infer.py output")
    parser.add_argument("--output", required=True, help="the PNG to write")
    args = parser.parse_args()
    results = {}
    for run in args.runs:
        label, sep, directory = run.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=DIR, got {run!r}")
        with open(os.path.join(directory, "metrics.json")) as f:
            results[label] = json.load(f)
    with atomic_path(args.output) as tmp_path:
        draw_chart(results).save(tmp_path, format="PNG")
    print(f"chart written to {args.output}")


if __name__ == "__main__":
    main()
