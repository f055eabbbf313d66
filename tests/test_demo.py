"""The CPU demo, end to end through `bash scripts/demo.sh`, at reduced size (its size flags)."""

import json
import os
import subprocess

from PIL import Image

from conftest import REPO_DIR


def run_bash_script(script, *flags):
    """Run `bash <script> <flags>` from the repo root as a user would; fail with its output."""
    env = {**os.environ, "SWANLAB_MODE": "disabled"}
    result = subprocess.run(
        ["bash", script, *map(str, flags)], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{script} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def test_demo_pipeline_at_reduced_size(tmp_path):
    workdir = tmp_path / "demo"
    result = run_bash_script("scripts/demo.sh", "--workdir", workdir, "--num_samples", 64, "--num_test", 8, "--max_steps", 40)

    # Training ran the requested steps and its loss fell.
    state = json.loads((workdir / "outputs" / "cpu_demo_tiny_cpu" / "trainer_state.json").read_text())
    assert state["global_step"] == 40
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) >= 6, state["log_history"]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses

    # The trained model, the untrained model and the mean box were all scored on the same test split.
    for name in ("trained", "untrained", "mean_box"):
        metrics = json.loads((workdir / "outputs" / "demo_eval" / name / "metrics.json").read_text())
        assert metrics["num_samples"] == 8, (name, metrics)
        assert 0 <= metrics["acc@0.5"] <= 1 and 0 <= metrics["mean_iou"] <= 1, (name, metrics)
    assert (workdir / "outputs" / "demo_eval" / "trained" / "vis" / "grid.jpg").is_file()
    assert "| trained tiny model |" in result.stdout and "| mean training box |" in result.stdout
    assert "sft_vqa_8gpu-z2.sh" in result.stdout  # ends by pointing at the real model's recipe


def test_generalisation_check_draws_other_data_and_trains_on_it(tmp_path):
    """scripts/check_generalisation.sh at reduced size: the data it draws really is the other
    colours, shapes and 160-640 px sides, and the demo's config trains and is scored on it."""
    workdir = tmp_path / "generalisation"
    run_bash_script("scripts/check_generalisation.sh", "--workdir", workdir, "--num_samples", 32, "--num_test", 8, "--max_steps", 4)

    data_dir = workdir / "data" / "demo"
    for split, count in (("train", 32), ("test", 8)):
        records = [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines()]
        assert len(records) == count
        for record in records:
            colour, shape = record["query"].rstrip("?").split()[-2:]
            assert colour in {"purple", "orange", "cyan", "pink"} and shape in {"diamond", "cross", "bar"}, record
            with Image.open(data_dir / record["image"][0]) as image:
                assert 160 <= min(image.size) and max(image.size) <= 640, (record, image.size)
    state = json.loads((workdir / "outputs" / "cpu_demo_tiny_cpu" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    metrics = json.loads((workdir / "outputs" / "demo_eval" / "trained" / "metrics.json").read_text())
    assert metrics["num_samples"] == 8
