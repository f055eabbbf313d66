import re

import pytest
from transformers import AutoProcessor

from conftest import rows_from_dataset, run_script
from model_families import FAMILIES
from utils import ImageSettings, load_image, model_frame_size


def table(output, title):
    """The rows of the markdown table under the heading that starts with `title`, as lists of cells."""
    section = output.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()[3:] if line.startswith("| ")]


def test_benchmark_tables_agree_with_independent_counts(tiny_model_dir, tmp_path):
    """The real script at toy size. Speed is not asserted; what the figures are made of is."""
    output = run_script(
        "scripts/benchmark.py", "--model", tiny_model_dir, "--num_samples", 8, "--rounds", 1,
        "--layouts", "max_length:1", "longest:4", "packed:4", "--loading_sides", 256, 512,
        "--inference_samples", 4, "--new_tokens", 4, "--seed", 3,
        env={"OMP_NUM_THREADS": "1"},
    ).stdout  # fmt: skip

    # The same synthetic images the script drew (same generator, seed and sides).
    run_script("scripts/make_synthetic_data.py", "--output_dir", tmp_path / "data", "--num_samples", 8,
               "--min_side", 480, "--max_side", 1024, "--seed", 3)  # fmt: skip
    sizes = [load_image(row["image"][0]).size for row in rows_from_dataset(tmp_path / "data", tmp_path / "images")]
    processor = AutoProcessor.from_pretrained(tiny_model_dir)

    # Published sizes, not the script's: Qwen2.5-VL-3B-Instruct has 3.75B parameters (its model card), of which
    # the language model is Qwen2.5-3B's 3.09B (tied embeddings counted once); the rest is the vision tower.
    text_b, vision_b = map(float, re.search(r"\(([\d.]+)B language \+ ([\d.]+)B vision parameters\)", output).groups())
    assert text_b + vision_b == pytest.approx(3.75, abs=0.02)
    assert text_b == pytest.approx(3.09, abs=0.02)
    loading = [list(map(float, row)) for row in table(output, "Data loading")]
    assert [row[0] for row in loading] == [256, 512]
    for side, tokens, patches, rate, consumption, workers in loading:
        settings = ImageSettings.from_processor(processor, int(side), FAMILIES["qwen2_5_vl"])
        frames = [model_frame_size(*size, settings) for size in sizes]
        expected_patches = sum(w * h for w, h in frames) / settings.patch_size**2 / len(frames)
        assert patches == pytest.approx(expected_patches, abs=0.05)
        # What the header says the column is: the fewest workers whose samples/s reach twice the consumption.
        assert workers * rate >= 2 * consumption * 0.98 and (workers - 1) * rate < 2 * consumption * 1.02
    # Tokens = image tokens (one per merge_size^2 patches) + the text, which is the same at every side except
    # the box's 4 coordinates, each at most one digit longer at the larger side (digits are single tokens).
    merge = ImageSettings.from_processor(processor, 256, FAMILIES["qwen2_5_vl"]).merge_size ** 2
    text_tokens = [tokens - patches / merge for _, tokens, patches, *_ in loading]
    assert text_tokens[0] > 10 and 0 <= text_tokens[1] - text_tokens[0] <= 4, text_tokens
    # The consumption estimate is a fixed compute budget over the FLOPs a sample costs: the bigger side's
    # estimate is smaller by the ratio of parameters x tokens (and patches), up to the table's rounding to units.
    (_, tokens_a, patches_a, _, consumption_a, _), (_, tokens_b, patches_b, _, consumption_b, _) = loading
    work_a, work_b = text_b * tokens_a + vision_b * patches_a, text_b * tokens_b + vision_b * patches_b
    rounding = 0.5 / consumption_a + 0.5 / consumption_b + 0.002
    assert consumption_a / consumption_b == pytest.approx(work_b / work_a, rel=rounding)

    # Every layout trains on the same samples: tokens per sample must match the loading table at 256.
    training = table(output, "Training step")
    assert [row[:2] for row in training] == [["max_length", "1"], ["longest", "4"], ["packed", "4"]]
    first_rate = float(training[0][2])
    for padding, _, samples_per_s, median_ratio, ratio_range, tokens_per_s, *_ in training:
        assert float(tokens_per_s) / float(samples_per_s) == pytest.approx(loading[0][1], rel=0.03), padding
        # One round: its ratio is the whole run's, so it matches the samples/s column, and the range is that value.
        assert float(median_ratio.rstrip("x")) == pytest.approx(float(samples_per_s) / first_rate, abs=0.011), padding
        assert ratio_range == f"{median_ratio.rstrip('x')}-{median_ratio}"
    collator = table(output, "Collator (")
    ratios = {row[0]: float(row[2].rstrip("%")) for row in collator}
    # max_length pads each sample to 256: its ratio is tokens per sample / 256. Packing pads nothing.
    assert ratios["max_length"] == pytest.approx(100 * loading[0][1] / 256, abs=0.1)
    assert ratios["max_length"] < ratios["longest"] < ratios["packed"] == 100.0
    assert len(table(output, "Inference")) == 2
