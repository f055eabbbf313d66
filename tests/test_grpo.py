"""grpo.py through its entry points (`python grpo.py`, `accelerate launch` with ZeRO-2 on 2 CPU processes),
starting from a tiny model that sft.py taught to answer 16 samples: its sampled boxes differ in IoU, so GRPO
has something to reinforce. Also: the reward's box is the SFT target, and bad input stops before loading."""

import json
import os
import subprocess
import sys

import pytest
from transformers import Qwen2_5_VLForConditionalGeneration

from conftest import REPO_DIR, run_script
from grpo import load_prompts
from model_families import FAMILIES
from test_sft import free_port
from utils import IGNORE_INDEX, ImageSettings, build_messages, read_answer_box
from vision_datacollator import GroundingCollator

CONFIG = "configs/demo_grpo_tiny_cpu.yaml"
ZERO2 = "configs/deepspeed_bf16_zero2.yaml"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny matrices: one thread is several times faster on a shared CPU


@pytest.fixture(scope="module")
def sft_model_dir(tiny_model_dir, sft_data_dir, tmp_path_factory):
    """sft.py's full fine-tune, trained until it answers its training samples with boxes, at 56 px."""
    output_dir = tmp_path_factory.mktemp("grpo_start") / "sft"
    run_script(
        "sft.py", "--config", "configs/tiny_cpu.yaml", "--model_name_or_path", tiny_model_dir,
        "--train_dataset_name", sft_data_dir / "train.jsonl", "--output_dir", output_dir,
        "--max_image_side", 56, "--max_steps", 150, "--learning_rate", 5e-3, "--lr_scheduler_type", "constant",
        "--save_strategy", "no", env=ONE_THREAD,
    )  # fmt: skip
    return output_dir.parent / "cpu_sft"


def grpo(*args, processes=1):
    """grpo.py with the demo's recipe cut down to steps of 2 questions x 4 completions, sampled hotter than
    the demo so that a memorised answer still varies within a group (equal rewards teach nothing)."""
    accelerate = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file", ZERO2,
                  "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", str(free_port())]
    launcher = [sys.executable] if processes == 1 else accelerate
    overrides = ["--per_device_train_batch_size", 8 // processes, "--num_generations", 4, "--temperature", 1.5,
                 "--learning_rate", 1e-3, "--lr_scheduler_type", "constant", "--warmup_steps", 0,
                 "--logging_steps", 1, "--save_steps", 2, "--use_cpu", "true"]  # fmt: skip
    command = [*launcher, "grpo.py", "--config", CONFIG, *map(str, overrides + list(args))]
    # The venv's bin first on PATH: DeepSpeed JIT-builds its CPU comm op with that ninja (see test_sft.py).
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, **ONE_THREAD, "PATH": path, "HF_HUB_OFFLINE": "1", "SWANLAB_MODE": "disabled"}
    result = subprocess.run(command, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout + result.stderr


def step_records(run_dir):
    with open(os.path.join(run_dir, "trainer_state.json")) as f:
        return [entry for entry in json.load(f)["log_history"] if "reward" in entry]


def weights(model_dir):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).state_dict()


def assert_trains_saves_resumes_and_infers(sft_model_dir, sft_data_dir, output_dir, processes):
    args = ["--model_name_or_path", sft_model_dir, "--train_dataset_name", sft_data_dir / "train.jsonl",
            "--output_dir", output_dir]  # fmt: skip
    log = grpo(*args, "--max_steps", 2, processes=processes)
    run_dir = output_dir.parent / f"cpu_{output_dir.name}"
    first = step_records(run_dir)
    assert [entry["step"] for entry in first] == [1, 2]
    for entry in first:  # the logged reward is the reward_weights sum of the per-function means (1.0, 0.5)
        expected = entry["rewards/iou_reward/mean"] + 0.5 * entry["rewards/format_reward/mean"]
        assert entry["reward"] == pytest.approx(expected, abs=1e-3)
    assert any(entry["rewards/format_reward/mean"] > 0 for entry in first), first  # the SFT model answers
    assert ImageSettings.load(run_dir) == ImageSettings.load(sft_model_dir)  # the starting model's frame
    start, trained = weights(sft_model_dir), weights(run_dir)
    assert any(not trained[name].equal(start[name]) for name in start)

    log = grpo(*args, "--max_steps", 3, processes=processes)
    assert f"Checkpoint detected, resuming training at {run_dir / 'checkpoint-2'}" in log
    resumed = step_records(run_dir)
    assert [entry["step"] for entry in resumed] == [1, 2, 3] and resumed[:2] == first
    resumed_weights = weights(run_dir)
    assert any(not resumed_weights[name].equal(trained[name]) for name in trained), resumed[2]

    eval_dir = output_dir.parent / f"eval_{output_dir.name}"
    run_script("infer.py", "--model_name_or_path", run_dir, "--test_dataset_name", sft_data_dir / "test.jsonl",
               "--output_dir", eval_dir, "--max_new_tokens", 32, env=ONE_THREAD)  # fmt: skip
    with open(eval_dir / "metrics.json") as f:
        assert json.load(f)["num_samples"] == 4  # the 4 test rows
    return log


def test_grpo_one_process_trains_saves_resumes_and_infers(sft_model_dir, sft_data_dir, tmp_path):
    assert_trains_saves_resumes_and_infers(sft_model_dir, sft_data_dir, tmp_path / "grpo", processes=1)


def test_grpo_deepspeed_zero2_two_processes(sft_model_dir, sft_data_dir, tmp_path):
    log = assert_trains_saves_resumes_and_infers(sft_model_dir, sft_data_dir, tmp_path / "zero2", processes=2)
    assert "distributed: DEEPSPEED, 2 process(es), ZeRO stage 2" in log


def test_reward_box_is_the_sft_target_box(processor, collator_rows, tmp_path):
    """For the same sample, the box GRPO's reward compares against and the image it shows are exactly the
    collator's SFT target box and image frame."""
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(
        json.dumps({"image": row["image"], "query": row["user"], "response": row["assistant"]}) + "\n"
        for row in collator_rows
    ))  # fmt: skip
    collator = GroundingCollator(processor, max_image_side=112, family=FAMILIES["qwen2_5_vl"])
    prompts = load_prompts(str(jsonl), collator.image_settings, processor)
    patch_size = collator.image_settings.patch_size
    assert len(prompts) == len(collator_rows)
    for row, prompt in zip(collator_rows, prompts):
        sample = collator.encode(row)
        answer_ids = sample["input_ids"][sample["labels"] != IGNORE_INDEX]
        target = processor.tokenizer.decode(answer_ids, skip_special_tokens=True)
        assert prompt["solution"] == read_answer_box(target), row["image"]
        _, grid_h, grid_w = sample["image_grid_thw"][0].tolist()
        assert prompt["image"].size == (grid_w * patch_size, grid_h * patch_size)
        assert prompt["prompt"] == build_messages(row["user"])


def test_bad_samples_are_all_named_before_the_model_loads(processor, collator_rows, tmp_path):
    good, no_box, gone = collator_rows[:3]
    lines = [
        {"image": good["image"], "query": good["user"], "response": good["assistant"]},
        {"image": no_box["image"], "query": no_box["user"], "response": "top left"},
        {"image": [str(tmp_path / "gone.png")], "query": gone["user"], "response": gone["assistant"]},
    ]
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    settings = ImageSettings.from_processor(processor, 112, FAMILIES["qwen2_5_vl"])
    with pytest.raises(ValueError) as error:
        load_prompts(str(jsonl), settings, processor)
    message = str(error.value)
    assert f"{jsonl}: 2 of 3 samples unusable" in message
    assert f"sample 2 (image {no_box['image'][0]})" in message and "bbox_2d" in message
    assert f"sample 3 (image {tmp_path / 'gone.png'})" in message and "not found" in message


def test_unknown_reward_name_lists_valid_ones(tiny_model_dir, sft_data_dir, tmp_path):
    result = run_script(
        "grpo.py", "--config", CONFIG, "--model_name_or_path", tiny_model_dir, "--reward_funcs", "iou", "giou",
        "--train_dataset_name", sft_data_dir / "train.jsonl", "--output_dir", tmp_path / "out", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    expected = "reward_funcs: ['iou', 'giou'] is not a list of reward names; valid names: ['format', 'iou']"
    assert expected in result.stderr
    assert "Loading weights" not in result.stderr


def test_settings_the_processor_would_resize_again_are_refused(processor, collator_rows, tmp_path):
    """Image settings with a smaller min_pixels than the processor's: it would enlarge their 28 px frame again and
    the boxes would be in the wrong frame, so loading stops and names an image."""
    row = collator_rows[0]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"image": row["image"], "query": row["user"], "response": row["assistant"]}) + "\n")
    settings = ImageSettings.from_processor(processor, 28, FAMILIES["qwen2_5_vl"])
    settings.min_pixels = 28 * 28  # the processor's is 56 * 56
    with pytest.raises(ValueError, match=f"{row['image'][0]}: the processor resized"):
        load_prompts(str(jsonl), settings, processor)
