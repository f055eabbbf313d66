"""grpo.py through its entry points (`python grpo.py`, `accelerate launch` with ZeRO-2 on 2 CPU processes),
starting from a tiny model that sft.py taught to answer 16 samples: its sampled boxes differ in IoU, so GRPO
has something to reinforce. Also: batches whose images differ in token count get each image's own positions,
the reward's box is the SFT target, and bad input stops before loading."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import Qwen2_5_VLForConditionalGeneration
from trl import GRPOConfig

from answers import build_messages, format_answer, read_answer_box
from conftest import REPO_DIR, run_script
from grpo import GroundingGRPOTrainer, image_token_marks, load_prompts
from model_families import FAMILIES
from rewards import reward_functions
from test_sft import free_port
from utils import IGNORE_INDEX, ImageSettings
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


def without_timing(records):
    return [{key: value for key, value in entry.items() if key != "step_time"} for entry in records]


def assert_trains_saves_resumes_and_infers(sft_model_dir, sft_data_dir, tmp_path, processes):
    """Trains 3 steps and keeps checkpoint-2; a run given a copy of checkpoint-2 alone resumes from it and must
    end where the uninterrupted run did, weights and logged step 3 alike: resuming restored the checkpoint's
    weights, optimizer and sampling state. Returns the resumed run's log."""

    def run(name):
        log = grpo("--model_name_or_path", sft_model_dir, "--train_dataset_name", sft_data_dir / "train.jsonl",
                   "--output_dir", tmp_path / name, "--max_steps", 3, "--save_total_limit", 2,
                   processes=processes)  # fmt: skip
        return log, tmp_path / f"cpu_{name}"

    _, run_dir = run("uninterrupted")
    records = step_records(run_dir)
    assert [entry["step"] for entry in records] == [1, 2, 3]
    for entry in records:  # the logged reward is the reward_weights sum of the per-function means (1.0, 0.5)
        expected = entry["rewards/iou_reward/mean"] + 0.5 * entry["rewards/format_reward/mean"]
        assert entry["reward"] == pytest.approx(expected, abs=1e-3)
    assert any(entry["rewards/format_reward/mean"] > 0 for entry in records), records  # the SFT model answers
    assert ImageSettings.load(run_dir) == ImageSettings.load(sft_model_dir)  # the starting model's frame
    start, at_step_2, trained = weights(sft_model_dir), weights(run_dir / "checkpoint-2"), weights(run_dir)
    assert any(not at_step_2[name].equal(start[name]) for name in start)
    assert any(not trained[name].equal(at_step_2[name]) for name in at_step_2), records[2]  # step 3 moved them

    resumed_dir = tmp_path / "cpu_resumed"
    shutil.copytree(run_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    log, _ = run("resumed")
    assert f"Checkpoint detected, resuming training at {resumed_dir / 'checkpoint-2'}" in log
    assert without_timing(step_records(resumed_dir)) == without_timing(records)
    resumed = weights(resumed_dir)
    assert all(resumed[name].equal(trained[name]) for name in trained)

    eval_dir = tmp_path / "eval"
    run_script("infer.py", "--model_name_or_path", resumed_dir, "--test_dataset_name", sft_data_dir / "test.jsonl",
               "--output_dir", eval_dir, "--max_new_tokens", 32, env=ONE_THREAD)  # fmt: skip
    with open(eval_dir / "metrics.json") as f:
        assert json.load(f)["num_samples"] == 4  # the 4 test rows
    return log


def test_grpo_one_process_trains_saves_resumes_and_infers(sft_model_dir, sft_data_dir, tmp_path):
    assert_trains_saves_resumes_and_infers(sft_model_dir, sft_data_dir, tmp_path, processes=1)


def test_grpo_deepspeed_zero2_two_processes(sft_model_dir, sft_data_dir, tmp_path):
    log = assert_trains_saves_resumes_and_infers(sft_model_dir, sft_data_dir, tmp_path, processes=2)
    assert "distributed: DEEPSPEED, 2 process(es), ZeRO stage 2" in log


# Image sizes and aspect ratios whose frames take 64, 32, 32 and 16 image tokens at max_image_side 224: in a batch
# of all four, the shorter prompts are left-padded by 16 to 48 tokens, more than the 15 tokens before the image
# (tiny model's tokenizer). At 112 px they take 16, 8, 8 and 4: padded by at most 12, every image mark stays
# inside the prompt.
MIXED_SHAPES = [(448, 448), (448, 224), (224, 448), (448, 112)]


def mixed_shapes_jsonl(directory):
    """Converter JSONL of MIXED_SHAPES images, each with a red square to find."""
    lines = []
    for number, (width, height) in enumerate(MIXED_SHAPES):
        image = Image.new("RGB", (width, height), "white")
        box = [width // 4, height // 4, width // 2, height // 2]
        ImageDraw.Draw(image).rectangle(box, fill="red")
        path = directory / f"{number}.png"
        image.save(path)
        line = {"image": [str(path)], "query": "where is the red square?", "response": format_answer(box)}
        lines.append(json.dumps(line) + "\n")
    (directory / "mixed_shapes.jsonl").write_text("".join(lines))
    return directory / "mixed_shapes.jsonl"


def test_grpo_trains_on_batches_mixing_image_shapes(tiny_model_dir, tmp_path):
    """Every step holds all four MIXED_SHAPES prompts (4 x 2 completions). trl 1.16 alone stops at the first step
    inside get_rope_index with a shape mismatch (huggingface/trl#5785)."""
    output_dir = tmp_path / "mixed"
    grpo("--model_name_or_path", tiny_model_dir, "--train_dataset_name", mixed_shapes_jsonl(tmp_path),
         "--max_image_side", 224, "--output_dir", output_dir, "--num_generations", 2,
         "--max_completion_length", 8, "--max_steps", 1, "--save_strategy", "no")  # fmt: skip
    assert [entry["step"] for entry in step_records(output_dir.parent / "cpu_mixed")] == [1]


@pytest.mark.parametrize("max_image_side", [112, 224])
def test_forward_positions_are_get_rope_index_of_each_unpadded_row(
    tiny_model_dir, processor, max_image_side, tmp_path
):
    """The mRoPE positions the trainer's loss forward gives each row of a batch mixing image shapes equal
    transformers' get_rope_index on that row alone (the processor's own ids and image marks, then the completion).
    trl 1.16 alone gives wrong positions at 112 px, and stops with a shape mismatch at 224 px."""
    family = FAMILIES["qwen2_5_vl"]
    settings = ImageSettings.from_processor(processor, max_image_side, family)
    prompts = load_prompts(str(mixed_shapes_jsonl(tmp_path)), settings, processor)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none",
                      per_device_train_batch_size=8, num_generations=2, max_completion_length=8)  # fmt: skip
    trainer = GroundingGRPOTrainer(model=model, reward_funcs=reward_functions(["format"]), args=args,
                                   train_dataset=prompts, processing_class=processor)  # fmt: skip
    rows = [prompts[index] for index in range(len(MIXED_SHAPES)) for _ in range(args.num_generations)]
    batch = trainer._generate_and_score_completions(rows)
    prompt_marks = image_token_marks(batch["prompt_ids"], model.config.image_token_id)
    assert not batch["mm_token_type_ids"][:, : prompt_marks.size(1)].equal(prompt_marks), (
        "trl now marks the image tokens of left-padded prompts where they are (huggingface/trl#5785 fixed): "
        "remove GroundingGRPOTrainer._get_per_token_logps_and_entropies and this assertion"
    )

    positions = []
    language_model = model.model.language_model
    hook = language_model.register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(kwargs["position_ids"]), with_kwargs=True
    )
    with torch.no_grad():
        trainer.compute_loss(model, batch)
    hook.remove()
    (forward_positions,) = positions

    rope_index = family.rope_index(settings.merge_size)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1).bool()
    for row, sample in enumerate(rows):
        text = processor.apply_chat_template(sample["prompt"], add_generation_prompt=True, tokenize=False)
        alone = processor(images=[sample["image"]], text=[text], return_tensors="pt")
        prompt_ids = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
        assert prompt_ids.equal(alone["input_ids"][0])
        completion_ids = batch["completion_ids"][row][batch["completion_mask"][row].bool()]
        input_ids = torch.cat([alone["input_ids"][0], completion_ids])[None]
        marks = torch.cat([alone["mm_token_type_ids"][0], torch.zeros_like(completion_ids)])[None]
        expected = rope_index(input_ids, marks, alone["image_grid_thw"])[:, 0]
        assert forward_positions[:, row, attention_mask[row]].equal(expected), (row, MIXED_SHAPES[row // 2])


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
    expected = "reward_funcs: ['iou', 'giou'] is not a list of reward names; valid names: ['format', 'iou', 'list_format', 'list_iou']"
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
