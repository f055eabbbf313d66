"""Evaluation by generation during training (generation_eval.py), through sft.py under `accelerate launch` with 2
processes: the logged figures are infer.py's on the same images and checkpoint, the best checkpoint is the one
with the highest logged accuracy, and the boxes are drawn at every evaluation."""

import json
import os

import pytest
from PIL import Image

from conftest import ACCELERATE_2, run_infer
from pictures import GRID_CELL, GRID_COLUMNS
from test_sft import assert_same_weights, launch, load_weights, log_history, tiny_args
from utils import load_sft_jsonl

MAX_STEPS, EVAL_STEPS, EVAL_BATCH = 60, 10, 4


def test_logged_box_accuracy_is_infers_and_picks_the_best_checkpoint(tiny_model_dir, sft_data_dir, tmp_path):
    # Trained and evaluated on the same 4 samples: the tiny model memorises them, so its accuracy climbs from 0
    # (measured: 0, 0, 0.5, 1, 1, 0.75 at steps 10 to 60).
    samples = tmp_path / "first4.jsonl"
    rows = load_sft_jsonl(sft_data_dir / "train.jsonl")[:4]
    lines = [json.dumps({"image": row["image"], "query": row["user"], "response": row["assistant"]}) for row in rows]
    samples.write_text("\n".join(lines) + "\n")
    args = [
        *tiny_args(tiny_model_dir, sft_data_dir, tmp_path / "run"),
        "--train_dataset_name", samples, "--test_dataset_name", samples, "--max_image_side", 56,
        "--per_device_train_batch_size", 2, "--max_steps", MAX_STEPS, "--learning_rate", 5e-3,
        "--lr_scheduler_type", "constant", "--eval_strategy", "steps", "--eval_steps", EVAL_STEPS,
        "--save_steps", EVAL_STEPS, "--load_best_model_at_end", "true", "--metric_for_best_model", "acc@0.5",
        "--per_device_eval_batch_size", EVAL_BATCH, "--eval_generation_max_new_tokens", 24,
    ]  # fmt: skip
    # One batch of 4 per evaluation: process 0 answers it, process 1 a spare row that is not counted (see
    # GenerationEvaluation.predict_share).
    launch([*ACCELERATE_2, "sft.py", *args], extra_env={"OMP_NUM_THREADS": "1"}, timeout=300)
    run_dir = tmp_path / "cpu_run"

    evaluations = [entry for entry in log_history(run_dir) if "eval_loss" in entry]
    steps = [entry["step"] for entry in evaluations]
    assert steps == list(range(EVAL_STEPS, MAX_STEPS + 1, EVAL_STEPS))
    accuracies = [entry["eval_acc@0.5"] for entry in evaluations]
    assert max(accuracies) > 0, accuracies
    # Ties keep the first: the samples are memorised before the last step, so the best is an earlier checkpoint.
    best_step = steps[accuracies.index(max(accuracies))]
    assert best_step < MAX_STEPS, accuracies
    with open(run_dir / "trainer_state.json") as f:
        state = json.load(f)
    assert state["best_model_checkpoint"] == str(run_dir / f"checkpoint-{best_step}")
    assert state["best_metric"] == max(accuracies)
    assert_same_weights(load_weights(run_dir), load_weights(run_dir / f"checkpoint-{best_step}"))

    # infer.py on the best checkpoint in one process, with training's batches (both generate 24 tokens at most).
    _, _, metrics = run_infer(
        "--model_name_or_path", run_dir / f"checkpoint-{best_step}", "--test_dataset_name", samples,
        output_dir=tmp_path / "infer", batch_size=EVAL_BATCH,
    )  # fmt: skip
    logged = evaluations[steps.index(best_step)]
    assert metrics["acc@0.5"] == logged["eval_acc@0.5"]
    assert metrics["mean_iou"] == pytest.approx(logged["eval_mean_iou"], abs=1e-9)
    assert metrics["mean_iou"] > 0

    assert sorted(os.listdir(run_dir / "eval_boxes")) == sorted(f"step-{step}.jpg" for step in steps)
    assert Image.open(run_dir / "eval_boxes" / f"step-{best_step}.jpg").size == (GRID_COLUMNS * GRID_CELL, GRID_CELL)
