"""Table and bar chart of scripts/resolution_study.sh: Acc@0.5 by target side (scoring.SIDE_BUCKETS) at each
image side.

    python scripts/plot_resolution_study.py outputs/resolution 112 224 336
"""

import argparse
import json
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pictures import chart_axes  # noqa: E402
from scoring import SIDE_BUCKETS, acc_by_target_side  # noqa: E402
from utils import atomic_path, write_text_atomic  # noqa: E402

BAR_COLORS = dict(zip(SIDE_BUCKETS, ((214, 96, 77), (67, 147, 195))))


def draw_chart(results: dict[int, dict]) -> Image.Image:
    """Grouped bars: one group per image side, one bar per target size, Acc@0.5 written on each bar."""
    width, height, bottom, top, left = 520, 360, 310, 70, 50
    title = "Acc@0.5 by target side: true box's longer side / image's short side"
    chart, draw, font = chart_axes((width, height), (left, top, bottom), title, 14)
    group_width = (width - left - 20) / len(results)
    for group, (side, by_side) in enumerate(results.items()):
        x = left + 10 + group * group_width
        for name, (acc, _count) in by_side.items():
            bar_height = (acc or 0.0) * (bottom - top)
            draw.rectangle((x, bottom - bar_height, x + group_width / 2 - 14, bottom), BAR_COLORS[name])
            draw.text((x + 2, bottom - bar_height - 16), "-" if acc is None else f"{acc:.2f}", "black", font)
            x += group_width / 2 - 8
        draw.text((left + 10 + group * group_width + group_width / 4, bottom + 8), f"{side} px", "black", font)
    for column, (name, color) in enumerate(BAR_COLORS.items()):
        draw.rectangle((left + column * 120, 30, left + 12 + column * 120, 42), color)
        draw.text((left + 18 + column * 120, 28), name, "black", font)
    return chart


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", help="resolution_study.sh's output folder: one demo workdir per side")
    parser.add_argument("sides", type=int, nargs="+")
    args = parser.parse_args()

    results = {}
    side_columns = " | ".join(f"Acc@0.5 {name} (n)" for name in SIDE_BUCKETS)
    lines = [f"| max_image_side | Acc@0.5 | mean IoU | {side_columns} |", "|---|---|---|---|---|"]
    for side in args.sides:
        eval_dir = os.path.join(args.study_dir, str(side), "outputs", "demo_eval", "trained")
        with open(os.path.join(eval_dir, "metrics.json")) as f:
            metrics = json.load(f)
        with open(os.path.join(eval_dir, "predictions.jsonl")) as f:
            results[side] = acc_by_target_side(map(json.loads, f))
        cells = " | ".join("-" if acc is None else f"{acc:.3f} ({n})" for acc, n in results[side].values())
        lines.append(f"| {side} | {metrics['acc@0.5']:.3f} | {metrics['mean_iou']:.3f} | {cells} |")
    table = "\n".join(lines) + "\n"
    print(table)
    write_text_atomic(os.path.join(args.study_dir, "table.md"), table)
    chart_path = os.path.join(args.study_dir, "acc_by_size.png")
    with atomic_path(chart_path) as tmp_path:
        draw_chart(results).save(tmp_path, format="PNG")
    print(f"table and chart written to {args.study_dir}/table.md and acc_by_size.png")


if __name__ == "__main__":
    main()
