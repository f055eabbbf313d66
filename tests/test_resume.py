"""Preemption and resuming through `python sft.py`, with real signals: SIGTERM saves and exits with
checkpoints.PREEMPTED_EXIT_CODE; after a SIGKILL and a torn newer checkpoint, the relaunch resumes from the newest
complete one. Each resume is checked on the weights it restored and on the loss curve it continues.
(The 2-process DeepSpeed ZeRO-2 case is test_sft.py's test_deepspeed_zero2_two_processes_sigterm_saves_and_resumes.)"""

import glob
import json
import os
import shutil
import signal
import sys

from safetensors.torch import load_file

from conftest import run_script
from test_sft import (
    assert_resumed_curve,
    assert_same_weights,
    load_weights,
    log_history,
    logged_steps,
    signal_when,
    tiny_args,
)
from checkpoints import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SWANLAB_MODE": "disabled"}


def test_sigterm_saves_exits_preempted_and_resume_restores_full_finetune(tiny_tied_model_dir, sft_data_dir, tmp_path):
    """On tied embeddings, as the real 3B has them (the ZeRO-2 resume test in test_sft.py has untied ones)."""
    # save_steps = max_steps: the only other checkpoint is the signal's. 8 steps = 2 epochs of 4 batches.
    args = [*tiny_args(tiny_tied_model_dir, sft_data_dir, tmp_path / "full"), "--max_steps", 8, "--save_steps", 8]
    command = [sys.executable, "sft.py", *map(str, args)]
    returncode, log = signal_when(command, ENV, tmp_path / "run1.log", logged_steps(2))
    assert returncode == PREEMPTED_EXIT_CODE, log
    run_dir = tmp_path / "cpu_full"
    (checkpoint,) = glob.glob(str(run_dir / "checkpoint-*"))
    stopped_at = int(checkpoint.rsplit("-", 1)[1])
    assert 2 <= stopped_at < 8
    assert f"preempted: saved {checkpoint} at step {stopped_at} of 8" in log
    assert not os.path.exists(run_dir / "model.safetensors")  # stopped, not finished
    assert (run_dir / PREEMPTED_MARKER).read_text() == f"step {stopped_at} of 8: {checkpoint}\n"
    checkpoint_history = log_history(checkpoint)

    result = run_script("sft.py", *args)
    assert f"resuming training at {checkpoint}" in result.stderr
    assert_resumed_curve(log_history(run_dir), checkpoint_history, stopped_at, 8)
    assert not os.path.exists(run_dir / PREEMPTED_MARKER)
    assert_final_run_loads_last_checkpoint(args, run_dir, "checkpoint-8")


def assert_final_run_loads_last_checkpoint(args, run_dir, last_checkpoint):
    """The same command once more: it resumes at max_steps, at an epoch's end (transformers 5.24 trains one
    more step when resumed at max_steps inside an epoch), trains nothing and saves the weights it loaded."""
    result = run_script("sft.py", *args)
    assert f"resuming training at {run_dir / last_checkpoint}" in result.stderr
    assert_same_weights(load_weights(run_dir), load_weights(run_dir / last_checkpoint))


def test_sigkill_then_torn_newer_checkpoint_resumes_lora_from_complete_one(tiny_model_dir, sft_data_dir, tmp_path):
    args = [*tiny_args(tiny_model_dir, sft_data_dir, tmp_path / "lora"), "--use_lora", "true", "--r", 4,
            "--max_steps", 8, "--save_steps", 2, "--save_total_limit", 3]  # fmt: skip
    run_dir = tmp_path / "cpu_lora"
    first_saved = lambda log: os.path.exists(run_dir / "checkpoint-2" / "trainer_state.json")  # noqa: E731
    signal_when([sys.executable, "sft.py", *map(str, args)], ENV, tmp_path / "run1.log", first_saved, signal.SIGKILL)
    complete = max(glob.glob(str(run_dir / "checkpoint-*" / "trainer_state.json")), key=os.path.getmtime)
    complete = os.path.dirname(complete)
    # A save cut short: the adapter file half written, no trainer_state.json (transformers writes it last).
    torn = f"{complete.rsplit('-', 1)[0]}-{int(complete.rsplit('-', 1)[1]) + 1}"
    shutil.copytree(complete, torn)
    os.remove(os.path.join(torn, "trainer_state.json"))
    adapter_file = os.path.join(torn, "adapter_model.safetensors")
    os.truncate(adapter_file, os.path.getsize(adapter_file) // 2)
    complete_history = [entry for entry in log_history(complete) if "loss" in entry]  # rotated away later

    result = run_script("sft.py", *args)
    moved_to = run_dir / f"incomplete-{os.path.basename(torn)}"
    assert f"incomplete checkpoint {torn} (no trainer_state.json): moved aside to {moved_to}" in result.stderr
    assert not os.path.exists(torn)
    assert os.path.isdir(moved_to)  # kept after the run, through its checkpoint rotation (save_total_limit)
    assert f"resuming training at {complete}" in result.stderr
    resumed_at = int(complete.rsplit("-", 1)[1])
    history = log_history(run_dir)
    assert [entry["step"] for entry in history if "loss" in entry] == list(range(1, 9))
    assert [entry for entry in history if "loss" in entry][:resumed_at] == complete_history
    assert any("lora_B" in name for name in load_weights(run_dir))  # the final model loads, adapter included

    assert_final_run_loads_last_checkpoint(args, run_dir, "checkpoint-8")
    adapter = load_file(run_dir / "checkpoint-8" / "adapter_model.safetensors")
    assert all(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)  # trained, not fresh


def test_only_torn_checkpoints_fail_with_how_to_start_over(sft_data_dir, tmp_path):
    run_dir = tmp_path / "cpu_torn"
    (run_dir / "checkpoint-3").mkdir(parents=True)
    (run_dir / "checkpoint-3" / "model.safetensors").write_bytes(b"\x00" * 64)  # cut short, no trainer_state.json
    # A model path that does not exist: the checkpoint is chosen before any model loading.
    result = run_script("sft.py", *tiny_args("/nonexistent/model", sft_data_dir, tmp_path / "torn"), check=False)
    assert result.returncode != 0
    assert f"incomplete checkpoint {run_dir / 'checkpoint-3'} (no trainer_state.json)" in result.stderr
    assert "holds no complete checkpoint-* folder to resume from" in result.stderr
    assert "--overwrite_output_dir true" in result.stderr
    assert os.path.isdir(run_dir / "incomplete-checkpoint-3")


def test_load_best_model_at_end_keeps_the_best_checkpoints_weights(tiny_tied_model_dir, sft_data_dir, tmp_path):
    """The saved model is the best checkpoint's, not the last one's, on tied embeddings as the real 3B has them.
    greater_is_better on the eval loss makes the best checkpoint an early one, as training lowers the loss."""
    # The eval loss decides here, so no answers need generating.
    args = [*tiny_args(tiny_tied_model_dir, sft_data_dir, tmp_path / "best"), "--max_steps", 4,
            "--eval_strategy", "steps", "--eval_steps", 1, "--save_steps", 1, "--save_total_limit", 4,
            "--load_best_model_at_end", "true", "--metric_for_best_model", "loss", "--greater_is_better", "true",
            "--eval_generation", "false"]  # fmt: skip
    run_script("sft.py", *args)
    run_dir = tmp_path / "cpu_best"
    with open(run_dir / "trainer_state.json") as f:
        best_checkpoint = json.load(f)["best_model_checkpoint"]
    assert best_checkpoint != str(run_dir / "checkpoint-4")
    final = load_weights(run_dir)
    assert_same_weights(final, load_weights(best_checkpoint))
    last = load_weights(run_dir / "checkpoint-4")
    assert any(not final[name].equal(last[name]) for name in last)
    assert final["lm_head.weight"].equal(final["model.language_model.embed_tokens.weight"])
