"""What the model's confidences are worth, from infer.py's predictions.jsonl: a coverage table (accuracy of the
most confident 25/50/75/100% of answers), the expected calibration error, and a reliability diagram.

    python scripts/plot_confidence.py outputs/demo_eval/trained --output_dir docs --name demo

Single-box answers count as right at IoU >= 0.5; for list answers every predicted box is one answer, right
when it is matched one-to-one to a true box at IoU >= 0.5 (the record's "matches").
Writes OUTPUT_DIR/confidence_NAME.md (the tables) and confidence_NAME.png (the diagram).
"""

import argparse
import json
import os
import sys

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from confidence import reliability, selective_accuracy  # noqa: E402
from utils import atomic_path, write_text_atomic  # noqa: E402


def confidences_and_hits(records) -> dict[str, tuple[list[float], list[bool]]]:
    """(confidences, right or wrong) of the scored answers, for single boxes and for the boxes of lists."""
    found = {"single box": ([], []), "list boxes": ([], [])}
    for record in records:
        if record["error"] is not None:
            continue
        if "gt_bbox" in record:
            if record["pred_bbox"] is not None:
                found["single box"][0].append(record["confidence"])
                found["single box"][1].append(record["iou"] >= 0.5)
            continue
        matched = {pair[0] for pair in record["matches"]}
        for index, item in enumerate(record["pred_boxes"]):
            found["list boxes"][0].append(item["confidence"])
            found["list boxes"][1].append(index in matched)
    return {name: values for name, values in found.items() if values[0]}


def draw_reliability(diagrams: dict[str, list[dict]]) -> Image.Image:
    """One panel per answer type: accuracy per confidence bin (bars, count written above) against the diagonal
    a calibrated model would follow."""
    panel, margin = 300, 40
    chart = Image.new("RGB", (len(diagrams) * (panel + 2 * margin), panel + 2 * margin + 20), "white")
    draw = ImageDraw.Draw(chart)
    font = ImageFont.load_default(size=12)
    for column, (name, bins) in enumerate(diagrams.items()):
        left, bottom = column * (panel + 2 * margin) + margin, margin + panel
        draw.text((left, 8), f"{name}: accuracy by confidence", "black", font)
        draw.rectangle((left, margin, left + panel, bottom), outline="black")
        draw.line((left, bottom, left + panel, margin), fill=(150, 150, 150), width=1)
        for tick in (0.0, 0.5, 1.0):
            draw.text((left - 26, bottom - tick * panel - 6), f"{tick:.1f}", "black", font)
            draw.text((left + tick * panel - 8, bottom + 4), f"{tick:.1f}", "black", font)
        for item in bins:
            if not item["count"]:
                continue
            x1, x2 = left + item["low"] * panel + 2, left + item["high"] * panel - 2
            top = bottom - item["accuracy"] * panel
            draw.rectangle((x1, top, x2, bottom), fill=(67, 147, 195))
            draw.text((x1, top - 14), str(item["count"]), "black", font)
        draw.text((left, bottom + 20), "confidence (bar: n answers)", "black", font)
    return chart


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_dir", help="an infer.py output folder (its predictions.jsonl)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--name", required=True, help="suffix of the written files")
    args = parser.parse_args()

    with open(os.path.join(args.eval_dir, "predictions.jsonl"), encoding="utf-8") as f:
        found = confidences_and_hits(map(json.loads, f))
    if not found:
        sys.exit(f"{args.eval_dir}/predictions.jsonl: no scored box with a confidence; run infer.py first")
    lines, diagrams = [], {}
    for name, (confidences, hits) in found.items():
        ece, diagrams[name] = reliability(confidences, hits)
        lines += [f"**{name}** ({len(hits)} answers, expected calibration error {ece:.3f})", ""]
        lines += ["| most confident | answers | Acc@0.5 |", "|---|---|---|"]
        lines += [f"| {row['coverage']:.0%} | {row['count']} | {row['accuracy']:.3f} |" for row in selective_accuracy(confidences, hits)]
        lines.append("")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.output_dir, exist_ok=True)
    write_text_atomic(os.path.join(args.output_dir, f"confidence_{args.name}.md"), table)
    with atomic_path(os.path.join(args.output_dir, f"confidence_{args.name}.png")) as tmp_path:
        draw_reliability(diagrams).save(tmp_path, format="PNG")
    print(f"written to {args.output_dir}/confidence_{args.name}.md and .png")


if __name__ == "__main__":
    main()
