"""scripts/gpu_check.sh --quick: the GPU check's own commands on CPU, so the GPU run cannot fail on a typo."""

import importlib.util
import os
import subprocess
import sys

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
