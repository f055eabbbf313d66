"""Shared fixtures: the tiny model and synthetic data are built once per session by the same
scripts a user runs, then reused read-only by every test."""

import json
import os
import subprocess
import sys

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)


ACCELERATE_2 = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
                "--num_processes", "2", "--main_process_port", "0"]  # fmt: skip


def run_script(*args, env=None, check=True, timeout=900, cwd=REPO_DIR):
    """Run `python <args>` from the repo root as a user would; return the CompletedProcess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "SWANLAB_MODE": "disabled", **(env or {})}
    result = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("tiny_model")
    run_script("scripts/make_tiny_model.py", "--output_dir", output_dir)
    return str(output_dir)


@pytest.fixture(scope="session")
def synthetic_dataset_dir(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("synthetic_textvqa")
    run_script("scripts/make_synthetic_data.py", "--output_dir", output_dir, "--num_samples", 40, "--seed", 1)
    return str(output_dir)


@pytest.fixture(scope="session")
def sft_data_dir(synthetic_dataset_dir, tmp_path_factory):
    """The converter's JSONL (boxes in original pixels) from the synthetic dataset: 16 train, 4 test rows."""
    data_dir = tmp_path_factory.mktemp("sft_data")
    run_script(
        "scripts/convert2sft_format.py", "--data_path", synthetic_dataset_dir, "--save_path", data_dir,
        "--train_range", "0:16", "--test_range", "16:20", "--num_workers", 1,
    )  # fmt: skip
    return data_dir


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def rows_from_dataset(dataset_dir, image_dir, limit=None):
    """Collator rows (as utils.load_sft_jsonl returns them) straight from a TextVQA-schema dataset."""
    import datasets

    from utils import format_answer

    os.makedirs(image_dir, exist_ok=True)
    dataset = datasets.load_dataset(str(dataset_dir), split="train")
    rows = []
    for index, record in enumerate(dataset.select(range(limit or len(dataset)))):
        path = os.path.join(image_dir, f"{index:06d}.png")
        record["image"].save(path)
        x, y, width, height = record["bbox"]
        rows.append({"image": [path], "user": record["question"], "assistant": format_answer([x, y, x + width, y + height])})
    return rows


@pytest.fixture(scope="session")
def collator_rows(synthetic_dataset_dir, tmp_path_factory):
    return rows_from_dataset(synthetic_dataset_dir, tmp_path_factory.mktemp("collator_images"), limit=12)


def infer_command(*args, output_dir, launcher=(sys.executable,), batch_size=3, env=None):
    """infer.py's command line and environment: one thread per process (as `accelerate launch` sets for CPU)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SWANLAB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [*launcher, "infer.py", *map(str, args), "--output_dir", str(output_dir), "--batch_size", str(batch_size)]
    return command + ["--max_new_tokens", "24"], env


def run_infer(*args, output_dir, launcher=(sys.executable,), batch_size=3, env=None):
    """infer.py run to completion: (the CompletedProcess, predictions.jsonl's records, metrics.json)."""
    command, env = infer_command(*args, output_dir=output_dir, launcher=launcher, batch_size=batch_size, env=env)
    result = subprocess.run(command, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    with open(os.path.join(output_dir, "predictions.jsonl")) as f:
        predictions = [json.loads(line) for line in f]
    with open(os.path.join(output_dir, "metrics.json")) as f:
        metrics = json.load(f)
    return result, predictions, metrics
