"""scripts/gpu_check.sh --quick: the GPU check's own commands on CPU, so the GPU run cannot fail on a typo."""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO_DIR


def test_gpu_check_quick_runs_every_part_and_writes_its_report(tiny_model_dir, tmp_path):
    report = tmp_path / "gpu_check.md"
    env = {
        **os.environ,
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
        "PYTHON": sys.executable,
        "GPU_CHECK_OUT": str(report),
        "GPU_CHECK_MODEL": tiny_model_dir,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--quick"], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr
    text = report.read_text()
    assert result.stdout == text  # printed as well as written
    assert "FAILED" not in text, text
    assert not os.path.exists(f"{report}.err")
    parts = [line for line in text.splitlines() if line.startswith("# max_image_side") or line.startswith("# LoRA")]
    liger = importlib.util.find_spec("liger_kernel") is not None
    assert len(parts) == (5 if liger else 3), parts
    if not liger:
        assert "Skipped: Liger rows (liger-kernel not installed" in text
    # Every part printed its training table, with one row per layout it was given.
    training_rows = [line for line in text.splitlines() if line.startswith(("| max_length |", "| longest |", "| packed |"))]
    assert text.count("## Training step") == len(parts)
    assert text.count("## Data loading") == 1 and text.count("## Inference") == 1
    assert len(training_rows) == 2 * (3 * (len(parts) - 1) + 1)  # collator + training tables
    # The first part's speed ratios are medians over the rounds it was given, each round's against the first row.
    first_training = text.split("## Training step", 1)[1]
    assert "vs first (median round) | rounds' range" in first_training and "each of the 2 rounds'" in first_training
    assert "| max_length | 1 | " in first_training and "| 1.00x | 1.00-1.00x |" in first_training

    # Loss parity, float32 on CPU: the same samples from the same weights give the same loss, step after step
    # (the later steps after AdamW updates, so the gradients agree too), whichever the padding.
    assert text.count("# Loss parity at max_image_side") == 1
    for title in ("max_length vs longest", "longest vs packed"):
        rows = parity_rows(text, title)
        assert [row[0] for row in rows] == ["1", "2"], rows
        for _, loss_a, loss_b, *_ in rows:
            assert math.isfinite(float(loss_a)) and float(loss_a) > 0
            assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-5), title
    assert "## Loss parity: packed vs packed + Liger\nskipped: " in text


def parity_rows(text, title):
    """The rows of the loss parity table `title`, as lists of cells (step, loss A, loss B, abs diff, rel diff)."""
    section = text.split(f"## Loss parity: {title}", 1)[1].split("\n#", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
