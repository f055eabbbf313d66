"""sft.py through its entry points: `accelerate launch` with DeepSpeed ZeRO-2 on 2 CPU processes,
and `python sft.py` for LoRA, the freeze switches, the tutorial's YAML and config errors."""

import glob
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from checkpoints import PREEMPTED_MARKER
from conftest import ACCELERATE_2, REPO_DIR, run_script
from utils import ImageSettings, load_sft_jsonl
from vision_datacollator import GroundingCollator

TINY_CONFIG = "configs/tiny_cpu.yaml"


def tiny_args(tiny_model_dir, sft_data_dir, output_dir):
    return [
        "--config", TINY_CONFIG,
        "--model_name_or_path", tiny_model_dir,
        "--train_dataset_name", sft_data_dir / "train.jsonl",
        "--test_dataset_name", sft_data_dir / "test.jsonl",
        "--output_dir", output_dir,
    ]  # fmt: skip


def log_history(run_dir):
    with open(os.path.join(run_dir, "trainer_state.json")) as f:
        return json.load(f)["log_history"]


def losses(history):
    return [entry["loss"] for entry in history if "loss" in entry]


def load_weights(model_dir):
    """Parameters by their names in the model (the file on disk uses the Hub checkpoint's names)."""
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).state_dict()


def assert_same_weights(actual, expected):
    assert actual.keys() == expected.keys()
    assert all(actual[name].equal(expected[name]) for name in expected)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(extra_env=None):
    # The venv's bin first, as scripts/test.sh has it: DeepSpeed JIT-builds its CPU comm op with the ninja on
    # PATH, and a different ninja than last time rebuilds it (about 2 minutes on 2 cores).
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "SWANLAB_MODE": "disabled", **(extra_env or {})}


def accelerate_command(*args, config_file="configs/deepspeed_bf16_zero2.yaml"):
    """`accelerate launch` of sft.py on 2 CPU processes, and the environment to run it in."""
    command = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch",
        "--config_file", config_file,
        "--num_processes", "2",
        "--mixed_precision", "no",
        "--main_process_port", str(free_port()),
        "sft.py", *map(str, args),
    ]  # fmt: skip
    return command, launch_env()


def launch(command, extra_env=None, timeout=900):
    result = subprocess.run(list(map(str, command)), cwd=REPO_DIR, env=launch_env(extra_env), capture_output=True,
                            text=True, timeout=timeout)  # fmt: skip
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout + result.stderr


def accelerate_launch(*args, config_file="configs/deepspeed_bf16_zero2.yaml"):
    return launch(accelerate_command(*args, config_file=config_file)[0])


def logged_steps(steps):
    return lambda log: log.count("'loss'") >= steps


def signal_when(command, env, log_path, ready, signum=signal.SIGTERM, timeout=600):
    """Start `command` in its own process group, logging to log_path; once ready(log text) holds, send
    `signum` to the whole group, as Slurm and a terminal's Ctrl-C do; return the exit status and the log."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ready(open(log_path).read()):
        assert process.poll() is None, f"exited {process.returncode} too early:\n{open(log_path).read()}"
        assert time.monotonic() < deadline, open(log_path).read()
        time.sleep(0.2)
    os.killpg(process.pid, signum)
    return process.wait(timeout=timeout), open(log_path).read()


def assert_resumed_curve(history, checkpoint_history, resumed_at, max_steps):
    """One record per step 1..max_steps; the ones up to the checkpoint are its own (a restart would log other
    learning rates), and the first loss after resuming is nearer the checkpoint's last than the first loss (a
    resume that kept the base weights starts over near the first)."""
    assert [entry["step"] for entry in history if "loss" in entry] == list(range(1, max_steps + 1))
    before = [entry for entry in checkpoint_history if "loss" in entry]
    assert [entry for entry in history if "loss" in entry][:resumed_at] == before
    curve = losses(history)
    assert abs(curve[resumed_at] - curve[resumed_at - 1]) < abs(curve[resumed_at] - curve[0]), curve


def test_deepspeed_zero2_two_processes_sigterm_saves_and_resumes(tiny_model_dir, sft_data_dir, tmp_path):
    """SIGTERM to `accelerate launch` (2 processes, ZeRO-2) mid-run: both ranks save the same step and stop;
    resuming restores the checkpoint's weights, and the same command continues the loss curve to max_steps."""
    args = [*tiny_args(tiny_model_dir, sft_data_dir, tmp_path / "zero2"), "--use_cpu", "true",
            "--max_steps", 8, "--save_steps", 8]  # fmt: skip
    command, env = accelerate_command(*args)
    returncode, log = signal_when(command, env, tmp_path / "run1.log", logged_steps(2))
    run_dir = tmp_path / "cpu_zero2"  # the tutorial's device prefix
    assert "distributed: DEEPSPEED, 2 process(es), ZeRO stage 2" in log
    # torch's launcher forwards the signal to the ranks, waits for them, then fails (exit 1) itself.
    assert returncode != 0
    (checkpoint,) = glob.glob(str(run_dir / "checkpoint-*"))
    stopped_at = int(checkpoint.rsplit("-", 1)[1])
    assert 2 <= stopped_at < 8
    assert f"preempted: saved {checkpoint} at step {stopped_at} of 8" in log
    # What a requeue script can test, since the launcher's exit status is a crash's.
    assert (run_dir / PREEMPTED_MARKER).read_text() == f"step {stopped_at} of 8: {checkpoint}\n"
    # ZeRO-2 shards the optimizer state: one shard per rank in the checkpoint.
    shards = sorted(os.listdir(os.path.join(checkpoint, f"global_step{stopped_at}")))
    assert [name for name in shards if "optim_states" in name] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    checkpoint_history = log_history(checkpoint)

    log = accelerate_launch(*args)
    assert f"Checkpoint detected, resuming training at {checkpoint}" in log
    assert_resumed_curve(log_history(run_dir), checkpoint_history, stopped_at, 8)
    assert not os.path.exists(run_dir / PREEMPTED_MARKER)  # completed
    # Once more: resumed at max_steps (8 = 4 epochs of 2 batches per rank), it trains nothing and saves what it loaded.
    log = accelerate_launch(*args)
    assert f"Checkpoint detected, resuming training at {run_dir / 'checkpoint-8'}" in log
    assert_same_weights(load_weights(run_dir), load_weights(run_dir / "checkpoint-8"))
    trained = load_weights(run_dir)
    AutoProcessor.from_pretrained(run_dir)
    assert ImageSettings.load(run_dir).max_image_side == 112
    initial = load_weights(tiny_model_dir)
    assert any(not trained[name].equal(initial[name]) for name in initial)


def test_deepspeed_zero3_saves_a_full_model(tiny_model_dir, sft_data_dir, tmp_path):
    # Through the user's launcher (config first, then any flags), on 2 CPU processes; the config says
    # max_steps 12, so a run of 4 steps shows the extra flags reach sft.py.
    args = [TINY_CONFIG, *tiny_args(tiny_model_dir, sft_data_dir, tmp_path / "zero3")[2:], "--use_cpu", "true"]
    launcher_env = {"GPUS_PER_NODE": "2", "MIXED_PRECISION": "no", "MASTER_PORT": str(free_port())}
    log = launch(["bash", "scripts/sft_vqa_8gpu-z3.sh", *args, "--max_steps", 4], launcher_env)
    assert max(entry["step"] for entry in log_history(tmp_path / "cpu_zero3")) == 4
    assert "distributed: DEEPSPEED, 2 process(es), ZeRO stage 3" in log
    initial = load_weights(tiny_model_dir)
    # Parameters are partitioned under ZeRO-3 init: the count must still be of full sizes.
    assert f"trainable parameters: {sum(t.numel() for t in initial.values())} of" in log
    trained = load_weights(tmp_path / "cpu_zero3")  # gathered at save (zero3_save_16bit_model: true)
    assert all(trained[name].shape == initial[name].shape for name in initial)
    assert all(not trained[name].equal(initial[name]) for name in initial)


def test_lora_saves_adapter_and_leaves_base_weights(tiny_model_dir, sft_data_dir, tmp_path):
    result = run_script(
        "sft.py", *tiny_args(tiny_model_dir, sft_data_dir, tmp_path / "lora"),
        "--use_lora", "true", "--r", 4, "--target_modules", "q_proj", "v_proj",
        "--gradient_checkpointing", "true", "--max_steps", 4, "--save_strategy", "no",
    )  # fmt: skip
    run_dir = tmp_path / "cpu_lora"
    trainable, total = map(int, re.search(r"trainable parameters: (\d+) of (\d+)", result.stderr).groups())
    assert 0 < trainable < total / 10
    adapter = load_file(run_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert sum(tensor.numel() for tensor in adapter.values()) == trainable
    # lora_B starts at zero: non-zero values mean gradients reached the adapters through checkpointing.
    assert all(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)
    assert not os.path.exists(run_dir / "model.safetensors")  # no full copy of the base model

    # Plain from_pretrained on the output dir loads base + adapter; the base weights are the original ones.
    loaded = load_weights(run_dir)
    assert any("lora_B" in name for name in loaded)
    base = load_weights(tiny_model_dir)
    loaded_base = {name.replace(".base_layer", ""): tensor for name, tensor in loaded.items() if "lora_" not in name}
    assert loaded_base.keys() == base.keys()
    assert all(loaded_base[name].equal(base[name]) for name in base)
    AutoProcessor.from_pretrained(run_dir)
    assert ImageSettings.load(run_dir) is not None


FREEZE_PREFIXES = {
    "freeze_vision_tower": ("model.visual.patch_embed.", "model.visual.blocks."),
    "freeze_merger": ("model.visual.merger.",),
    "freeze_llm": ("model.language_model.", "lm_head."),
}


@pytest.mark.parametrize(
    "switches", [("freeze_vision_tower", "freeze_llm"), ("freeze_merger",)], ids=["vision_tower+llm", "merger"]
)
def test_freeze_switches_keep_frozen_parts_bit_identical(tiny_model_dir, sft_data_dir, tmp_path, switches):
    flags = [item for switch in switches for item in (f"--{switch}", "true")]
    result = run_script(
        "sft.py", *tiny_args(tiny_model_dir, sft_data_dir, tmp_path / "freeze"), *flags,
        "--gradient_checkpointing", "true", "--max_steps", 3, "--save_strategy", "no",
    )  # fmt: skip
    initial = load_weights(tiny_model_dir)
    trained = load_weights(tmp_path / "cpu_freeze")
    assert initial.keys() == trained.keys()
    frozen_prefixes = tuple(prefix for switch in switches for prefix in FREEZE_PREFIXES[switch])
    frozen = [name for name in initial if name.startswith(frozen_prefixes)]
    assert frozen
    for name in frozen:
        assert trained[name].equal(initial[name]), name
    # Everything else trained: each unfrozen part has changed weights.
    for switch, prefixes in FREEZE_PREFIXES.items():
        if switch not in switches:
            assert any(not trained[n].equal(initial[n]) for n in initial if n.startswith(prefixes)), switch
    trainable = int(re.search(r"trainable parameters: (\d+) of", result.stderr).group(1))
    assert trainable == sum(tensor.numel() for name, tensor in initial.items() if name not in frozen)


def test_fast_config_with_dataloader_workers_trains_like_the_main_process(tiny_model_dir, sft_data_dir, tmp_path):
    """The fast 3B config, scaled down to the tiny model on CPU: collating in 2 worker processes must
    give the very same training (same batches, same losses) as collating in the main process."""
    fast_config = "configs/SFT_Qwen2_5-VL-3B-Instruct_vqa_fast.yaml"
    with open(os.path.join(REPO_DIR, fast_config)) as f:
        in_main_process = yaml.safe_load(f)
    for key in ("dataloader_prefetch_factor", "dataloader_persistent_workers"):  # only valid with workers
        del in_main_process[key]
    main_config = tmp_path / "fast_in_main_process.yaml"
    main_config.write_text(yaml.safe_dump({**in_main_process, "dataloader_num_workers": 0}))
    scaled_down = [
        "--model_name_or_path", tiny_model_dir, "--torch_dtype", "float32", "--max_image_side", 112,
        "--train_dataset_name", sft_data_dir / "train.jsonl", "--test_dataset_name", sft_data_dir / "test.jsonl",
        "--max_steps", 3, "--learning_rate", "1e-3", "--use_cpu", "true", "--bf16", "false", "--bf16_full_eval", "false",
        "--use_liger_kernel", "false", "--dataloader_pin_memory", "false", "--eval_strategy", "no",
        "--save_strategy", "no", "--report_to", "none", "--logging_steps", 1,
    ]  # fmt: skip
    run_script("sft.py", "--config", fast_config, *scaled_down, "--dataloader_num_workers", 2,
               "--output_dir", tmp_path / "workers")  # fmt: skip
    run_script("sft.py", "--config", main_config, *scaled_down, "--output_dir", tmp_path / "main")
    with_workers = losses(log_history(tmp_path / "cpu_workers"))
    assert len(with_workers) == 3
    assert with_workers == losses(log_history(tmp_path / "cpu_main"))


def test_tutorial_config_with_warmup_ratio_eval_and_swanlab(tiny_model_dir, sft_data_dir, tmp_path):
    """The tutorial's 3B YAML, every key as given, scaled down on the command line to the tiny model."""
    result = run_script(
        "sft.py", "--config", "configs/SFT_Qwen2_5-VL-3B-Instruct_vqa.yaml",
        "--model_name_or_path", tiny_model_dir, "--torch_dtype", "float32",
        "--train_dataset_name", sft_data_dir / "train.jsonl", "--test_dataset_name", sft_data_dir / "test.jsonl",
        "--output_dir", tmp_path / "tutorial", "--max_image_side", 112,
        "--max_steps", 10, "--learning_rate", "1e-3", "--use_cpu", "true", "--bf16", "false", "--bf16_full_eval", "false",
        env={"SWANLAB_MODE": "offline", "SWANLAB_LOG_DIR": str(tmp_path / "swanlog")},
    )  # fmt: skip
    assert "warmup_ratio is deprecated" in result.stderr
    history = log_history(tmp_path / "cpu_tutorial")
    learning_rates = [entry["learning_rate"] for entry in history if "loss" in entry]
    assert learning_rates[0] < learning_rates[1]  # warmup (0.1 of 10 steps); cosine alone would start at the peak
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(eval_losses) == 10  # eval_steps: 0.1
    assert eval_losses[-1] < eval_losses[0]
    # Evaluation by generation is on by default: box figures at every evaluation, and a picture of the boxes.
    assert all("eval_acc@0.5" in entry and "eval_mean_iou" in entry for entry in history if "eval_loss" in entry)
    assert len(os.listdir(tmp_path / "cpu_tutorial" / "eval_boxes")) == 10
    # report_to: swanlab logged the run offline, the box figures and pictures too.
    (run_file,) = glob.glob(str(tmp_path / "swanlog" / "run-*" / "run-*.swanlab"))
    with open(run_file, "rb") as f:
        logged = f.read()
    assert all(key in logged for key in (b"train/loss", b"eval/acc@0.5", b"eval/mean_iou", b"eval/boxes"))
    assert len(glob.glob(str(tmp_path / "swanlog" / "run-*" / "media" / "image" / "*"))) == 10


@pytest.mark.parametrize(
    "extra_args, expected",
    [
        (
            ["--data_collator", "NoSuchCollator", "--padding", "wide", "--max_image_side", 0,
             "--eval_strategy", "steps", "--test_dataset_name", "missing/test.jsonl",
             "--eval_generation", "false", "--metric_for_best_model", "acc@0.5"],
            ["data_collator: unknown 'NoSuchCollator'", "padding: unknown 'wide'",
             "max_image_side: must be positive", "test_dataset_name: file not found: missing/test.jsonl",
             "metric_for_best_model: acc@0.5 comes from eval_generation, which is off"],
        ),
        (["--train_dataset_name", "missing/train.jsonl"], ["train_dataset_name: file not found: missing/train.jsonl"]),
        # Without liger-kernel (this venv), or with it on CPU (tiny_cpu.yaml has use_cpu: true).
        (["--use_liger_kernel", "true"], ["use_liger_kernel: ", "set use_liger_kernel: false"]),
        (["--train_dataset_name", "BAD_JSONL"], [":2: bad line"]),
    ],
)  # fmt: skip
def test_bad_config_fails_before_model_loading(sft_data_dir, tmp_path, extra_args, expected):
    bad_jsonl = tmp_path / "bad.jsonl"
    with open(sft_data_dir / "train.jsonl") as f:
        bad_jsonl.write_text(f.readline() + '{"image": ["x.png"]}\n')  # line 2 lacks query and response
    extra_args = [str(bad_jsonl) if arg == "BAD_JSONL" else arg for arg in extra_args]
    # A model path that does not exist: any attempt to load the model would fail with another message.
    args = tiny_args("/nonexistent/model", sft_data_dir, tmp_path / "bad")
    result = run_script("sft.py", *args, *extra_args, check=False)
    assert result.returncode != 0
    for message in expected:
        assert message in result.stderr, result.stderr
    assert "/nonexistent/model" not in result.stderr  # failed before touching the model
    assert not os.path.exists(tmp_path / "cpu_bad")


def test_bf16_full_finetune_outside_deepspeed_updates_weights_as_float32_does(tiny_model_dir, sft_data_dir, tmp_path):
    """torch_dtype bfloat16 + bf16 (the real configs' settings) without DeepSpeed: one AdamW step of lr 1e-5
    moves the weights as the same step on float32 weights does. In bf16 weights, such a step rounds away."""
    initial = load_weights(tiny_model_dir)

    def update(torch_dtype):
        output_dir = tmp_path / torch_dtype
        run_script("sft.py", *tiny_args(tiny_model_dir, sft_data_dir, output_dir), "--torch_dtype", torch_dtype,
                   "--bf16", "true", "--learning_rate", 1e-5, "--max_steps", 1, "--save_strategy", "no")  # fmt: skip
        trained = load_weights(tmp_path / f"cpu_{torch_dtype}")
        return {name: trained[name].float() - initial[name] for name in initial}

    reference, bf16_update = update("float32"), update("bfloat16")
    moved = [name for name in reference if reference[name].abs().max() > 0]
    assert sum(reference[name].count_nonzero() for name in moved) > 0.5 * sum(initial[name].numel() for name in moved)
    for name in moved:
        assert torch.allclose(bf16_update[name], reference[name], atol=1e-7), name


def test_too_long_samples_are_dropped_before_training_on_every_rank(tiny_model_dir, sft_data_dir, processor, tmp_path):
    """Batch 1 with too_long: drop (the real full fine-tuning configs' settings) on 2 processes: over-long samples
    are counted before training and both ranks train on the same number of batches of the rest. Dropped inside
    the collator, a rank whose batch held only an over-long sample raised while the other waited for it."""
    rows = load_sft_jsonl(sft_data_dir / "train.jsonl")
    encoder = GroundingCollator(processor, max_seq_length=100_000, max_image_side=112)
    lengths = [len(encoder.encode(row)["input_ids"]) for row in rows]
    limit = sorted(lengths)[len(lengths) // 2]
    dropped = sum(length > limit for length in lengths)
    assert 0 < dropped < len(rows)
    args = [*tiny_args(tiny_model_dir, sft_data_dir, tmp_path / "ddp"), "--use_cpu", "true", "--max_steps", -1,
            "--num_train_epochs", 1, "--per_device_train_batch_size", 1, "--max_seq_length", limit,
            "--too_long", "drop", "--save_strategy", "no"]  # fmt: skip
    log = launch([*ACCELERATE_2, "sft.py", *args], timeout=300)
    assert f"{dropped} of {len(rows)} samples exceed max_seq_length={limit}" in log
    assert "tokens > max_seq_length" not in log  # nothing left for the collator to drop
    with open(tmp_path / "cpu_ddp" / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == math.ceil((len(rows) - dropped) / 2)
