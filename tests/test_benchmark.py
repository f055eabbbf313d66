import math
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

    # Qwen2.5-VL-3B-Instruct has 3.75B parameters: the architecture behind every estimate.
    text_b, vision_b = map(float, re.search(r"\(([\d.]+)B language \+ ([\d.]+)B vision parameters\)", output).groups())
    assert text_b + vision_b == pytest.approx(3.75, abs=0.02)
    loading = table(output, "Data loading")
    assert [int(row[0]) for row in loading] == [256, 512]
    for side, tokens, patches, rate, consumption, workers in (map(float, row) for row in loading):
        settings = ImageSettings.from_processor(processor, int(side), FAMILIES["qwen2_5_vl"])
        frames = [model_frame_size(*size, settings) for size in sizes]
        expected_patches = sum(w * h for w, h in frames) / settings.patch_size**2 / len(frames)
        assert patches == pytest.approx(expected_patches, abs=0.05)
        assert tokens > expected_patches / settings.merge_size**2  # image tokens plus the text
        flops = 6 * (text_b * 1e9 * tokens + vision_b * 1e9 * patches)
        assert consumption == pytest.approx(0.4 * 989e12 / flops, rel=0.01, abs=0.5)
        assert math.ceil(2 * consumption / rate * 0.98) <= workers <= math.ceil(2 * consumption / rate * 1.02)

    # Every layout trains on the same samples: tokens per sample must match the loading table at 256.
    training = table(output, "Training step")
    assert [row[:2] for row in training] == [["max_length", "1"], ["longest", "4"], ["packed", "4"]]
    for padding, _, samples_per_s, _, tokens_per_s, *_ in training:
        assert float(tokens_per_s) / float(samples_per_s) == pytest.approx(float(loading[0][1]), rel=0.03), padding
    collator = table(output, "Collator (")
    ratios = {row[0]: float(row[2].rstrip("%")) for row in collator}
    # max_length pads each sample to 256: its ratio is tokens per sample / 256.
    assert ratios["max_length"] == pytest.approx(100 * float(loading[0][1]) / 256, abs=0.1)
    assert len(table(output, "Inference")) == 2
