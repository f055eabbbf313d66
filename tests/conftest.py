"""Shared fixtures: the tiny models, synthetic data and trained "answering" models are built by the same
scripts a user runs, then reused read-only by every test. The models are built once per session and shared
by the pytest-xdist workers (built_once); the data, a few seconds, once per worker."""

import glob
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from filelock import FileLock

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORRUPT_LINE = 2  # 0-based line of eval.jsonl (the data_dir fixture) whose image cannot be decoded
sys.path[:0] = [REPO_DIR, os.path.join(REPO_DIR, "scripts")]


# The longest files first (docs/testing.md has the durations): scripts/test.sh runs files on parallel workers,
# which then finish together instead of one worker running a long file alone at the end.
LONGEST_FILES_FIRST = (
    "test_sft.py", "test_demo.py", "test_infer.py", "test_serving.py", "test_grpo.py", "test_convert.py"
)  # fmt: skip


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


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


def script_stops(script, *args):
    """scripts/<script>.py's main(args) in this process, which must stop on bad input before doing any work;
    returns the message it stops with. Each subprocess would spend seconds importing torch for the same check."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as stop:
        module.main([str(arg) for arg in args])
    assert isinstance(stop.value.code, str), f"{script} {args} stopped with code {stop.value.code}, no message"
    return stop.value.code


def built_once(tmp_path_factory, worker_id, name, build):
    """The folder `name`, filled by build(folder) once per session: the first xdist worker to ask builds it
    under a lock while the others wait, then all read it. Shared paths also keep what a model records of
    its base (the model card's base_model) the same on every worker."""
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # the session's folder, above the workers' own
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not os.path.exists(f"{folder}.built"):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            open(f"{folder}.built", "w").close()
    return folder


def tiny_model(tmp_path_factory, worker_id, name, *flags):
    def build(folder):
        run_script("scripts/make_tiny_model.py", *flags, "--output_dir", folder)

    return str(built_once(tmp_path_factory, worker_id, name, build))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, worker_id):
    return tiny_model(tmp_path_factory, worker_id, "tiny_model")


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory, worker_id):
    """The tiny Qwen2.5-VL with lm_head tied to embed_tokens, as the real 3B (and Qwen3-VL-4B) have it."""
    return tiny_model(tmp_path_factory, worker_id, "tiny_tied_model", "--tie_word_embeddings")


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory, worker_id):
    return tiny_model(tmp_path_factory, worker_id, "tiny_qwen3_vl", "--family", "qwen3_vl")


@pytest.fixture(scope="session")
def tiny_qwen3_5_dir(tmp_path_factory, worker_id):
    return tiny_model(tmp_path_factory, worker_id, "tiny_qwen3_5", "--family", "qwen3_5")


@pytest.fixture(scope="session")
def synthetic_dataset_dir(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("synthetic_textvqa")
    run_script("scripts/make_synthetic_data.py", "--output_dir", output_dir, "--num_samples", 40, "--seed", 1)
    return str(output_dir)


@pytest.fixture(scope="session")
def sft_data_dir(synthetic_dataset_dir, tmp_path_factory):
    """The converter's JSONL (boxes in original pixels) from the synthetic dataset: 16 train, 4 val, 4 test rows."""
    data_dir = tmp_path_factory.mktemp("sft_data")
    run_script(
        "scripts/convert2sft_format.py", "--data_path", synthetic_dataset_dir, "--save_path", data_dir,
        "--train_range", "0:16", "--val_range", "20:24", "--test_range", "16:20", "--num_workers", 1,
    )  # fmt: skip
    return data_dir


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def rows_from_dataset(dataset_dir, image_dir, limit=None):
    """Collator rows (as utils.load_sft_jsonl returns them) straight from a TextVQA-schema dataset."""
    import datasets

    from answers import format_answer

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


@pytest.fixture(scope="session")
def data_dir(synthetic_dataset_dir, tmp_path_factory):
    """test.jsonl: 8 converted samples; first4/last4.jsonl: its halves, to train on; eval.jsonl:
    test.jsonl with a sample whose image file is corrupt inserted at CORRUPT_LINE."""
    data_dir = tmp_path_factory.mktemp("infer_data")
    run_script(
        "scripts/convert2sft_format.py", "--data_path", synthetic_dataset_dir, "--save_path", data_dir,
        "--type", "test", "--train_range", "8:40", "--test_range", "0:8", "--num_workers", 1,
    )  # fmt: skip
    lines = (data_dir / "test.jsonl").read_text().splitlines(keepends=True)
    (data_dir / "first4.jsonl").write_text("".join(lines[:4]))
    (data_dir / "last4.jsonl").write_text("".join(lines[4:]))
    from answers import format_answer

    (data_dir / "test" / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    corrupt = {"image": ["test/corrupt.jpg"], "query": "where is the red square?", "response": format_answer([1, 2, 30, 40])}
    (data_dir / "eval.jsonl").write_text("".join(lines[:CORRUPT_LINE] + [json.dumps(corrupt) + "\n"] + lines[CORRUPT_LINE:]))
    return data_dir


def train(model_dir, train_file, output_dir, *extra_args):
    """sft.py with the tiny CPU recipe at 56 px; returns the run dir (sft.py prefixes the device)."""
    run_script(
        "sft.py", "--config", "configs/tiny_cpu.yaml", "--model_name_or_path", model_dir,
        "--train_dataset_name", train_file, "--output_dir", output_dir, "--max_image_side", 56,
        "--per_device_train_batch_size", 4, "--save_strategy", "no", *extra_args,
        env={"OMP_NUM_THREADS": "1"},  # small matrices: one thread is several times faster on a shared CPU
    )  # fmt: skip
    (run_dir,) = glob.glob(f"{output_dir.parent}/*_{output_dir.name}")
    return run_dir


def train_lora(base_dir, train_file, output_dir, max_steps):
    """sft.py LoRA (r 8 on the language model's q/v_proj, lr 1e-2) on top of base_dir; returns the adapter dir."""
    lora = ["--use_lora", "true", "--r", 8, "--lora_alpha", 16, "--target_modules", "q_proj", "v_proj"]
    return train(base_dir, train_file, output_dir, *lora, "--max_steps", max_steps, "--learning_rate", 1e-2)


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


def assert_same_predictions(first, second, first_metrics=None, second_metrics=None):
    """The same prediction records, confidences to float tolerance (merged LoRA weights and base + adapter give
    the same log-softmax, summed in another order), and the same metrics apart from the mAP ranked by them."""
    confidence_of = [[record.get("confidence") or -1.0 for record in records] for records in (first, second)]
    assert confidence_of[0] == pytest.approx(confidence_of[1], rel=1e-5)
    strip = [[{k: v for k, v in record.items() if k != "confidence"} for record in records] for records in (first, second)]
    assert strip[0] == strip[1]
    if first_metrics is not None:
        ranked = ("model", "map", "map_50", "map_75")
        assert {k: v for k, v in first_metrics.items() if k not in ranked} == {
            k: v for k, v in second_metrics.items() if k not in ranked
        }


ANSWERING_STEPS = 150


@pytest.fixture(scope="session")
def answering_model(request, data_dir, tmp_path_factory, worker_id):
    """answering_model(family): that family's tiny model fully trained by sft.py until it answers the first 4
    test samples with their boxes (memorised: the point is answers to score, right and wrong, not
    generalisation), with its last step also saved as a checkpoint. Trained once per session."""
    base_fixture = {"qwen2_5_vl": "tiny_model_dir", "qwen3_vl": "tiny_qwen3_vl_dir", "qwen3_5": "tiny_qwen3_5_dir"}

    def trained(family):
        def build(folder):
            train(
                request.getfixturevalue(base_fixture[family]), data_dir / "first4.jsonl", folder / "model",
                "--max_steps", ANSWERING_STEPS, "--learning_rate", 5e-3, "--lr_scheduler_type", "constant",
                "--save_strategy", "steps", "--save_steps", ANSWERING_STEPS,
            )  # fmt: skip

        folder = built_once(tmp_path_factory, worker_id, f"answering_{family}", build)
        (run_dir,) = glob.glob(f"{folder}/*_model")
        return run_dir

    return trained
