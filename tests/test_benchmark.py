import re

from conftest import run_script


def test_benchmark_prints_all_tables(tiny_model_dir):
    """Runs the real script at toy size: every table is there, with sane ratios (speed is not asserted)."""
    output = run_script(
        "scripts/benchmark.py", "--model", tiny_model_dir, "--num_samples", 8, "--batch_size", 4,
        "--rounds", 1, "--inference_samples", 4, "--new_tokens", 4,
        env={"OMP_NUM_THREADS": "1"},
    ).stdout  # fmt: skip
    collator_rows = dict(re.findall(r"^\| (max_length|longest|packed) \| ([\d.]+)% \|", output, re.M))
    assert set(collator_rows) == {"max_length", "longest", "packed"}
    assert float(collator_rows["packed"]) == 100.0
    assert float(collator_rows["max_length"]) < float(collator_rows["longest"]) <= 100.0
    training_rows = re.findall(r"^\| (max_length|longest|packed) \| ([\d.]+) \| ([\d.]+)x \|", output, re.M)
    assert [name for name, *_ in training_rows] == ["max_length", "longest", "packed"]
    assert training_rows[0][2] == "1.00"
    assert re.search(r"^\| 16 \| [\d.]+ \| [\d.]+x \|", output, re.M)
