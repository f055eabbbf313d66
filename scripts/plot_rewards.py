"""Draw a GRPO run's reward curves (trainer_state.json's log history) as a PNG, with PIL only.

    python scripts/plot_rewards.py --run_dir outputs/cpu_demo_grpo_tiny_cpu --output docs/grpo_reward_curve.png
"""

import argparse
import json
import os

from PIL import Image, ImageDraw

CURVES = {"rewards/iou_reward/mean": (200, 40, 40), "rewards/format_reward/mean": (40, 120, 200)}
WIDTH, HEIGHT, MARGIN = 640, 360, 48


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="a grpo.py output dir (or checkpoint) with trainer_state.json")
    parser.add_argument("--output", required=True, help="the PNG to write")
    args = parser.parse_args()
    with open(os.path.join(args.run_dir, "trainer_state.json")) as f:
        history = [entry for entry in json.load(f)["log_history"] if "reward" in entry]
    if not history:
        raise SystemExit(f"{args.run_dir}/trainer_state.json logs no rewards: is it a grpo.py run?")
    last_step = history[-1]["step"]

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN

    def point(step, value):  # rewards are in [0, 1]
        return MARGIN + plot_w * step / last_step, HEIGHT - MARGIN - plot_h * value

    draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], outline="black")
    for value in (0, 0.25, 0.5, 0.75, 1):
        x, y = point(0, value)
        draw.line([x, y, WIDTH - MARGIN, y], fill=(220, 220, 220))
        draw.text((8, y - 6), f"{value:.2f}", fill="black")
    draw.text((MARGIN, HEIGHT - MARGIN + 8), "0", fill="black")
    draw.text((WIDTH - MARGIN - 40, HEIGHT - MARGIN + 8), f"step {last_step}", fill="black")
    for row, (key, colour) in enumerate(CURVES.items()):
        draw.line([point(entry["step"], entry[key]) for entry in history], fill=colour, width=2)
        draw.text((MARGIN + 8, MARGIN + 8 + 14 * row), key.split("/")[1] + " (mean of sampled answers)", fill=colour)
    tmp_path = f"{args.output}.tmp.png"
    image.save(tmp_path)
    os.replace(tmp_path, args.output)
    print(f"{len(history)} logged steps drawn to {args.output}")


if __name__ == "__main__":
    main()
