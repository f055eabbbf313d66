"""Mixing several training files (data_mixing.py): the mix through sft.py, per-source losses, the collator's
source ids in every padding mode."""

import json
import math
import re

import pytest
import torch

from conftest import run_script
from data_mixing import SourceLosses
from utils import IGNORE_INDEX, load_sft_jsonl
from vision_datacollator import SOURCE_IDS, GroundingCollator


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def mixed_files(sft_data_dir, tmp_path_factory):
    """400 grounding rows and 400 question -> answer rows on the 16 training images (absolute image paths)."""
    folder = tmp_path_factory.mktemp("mix")
    rows = load_sft_jsonl(sft_data_dir / "train.jsonl")
    grounding = [{"image": row["image"], "query": row["user"], "response": row["assistant"]} for row in rows] * 25
    question = "What shape is it? Answer the question using a single word or phrase."
    vqa = [{"image": row["image"], "query": question, "response": "square", "answers": ["square"] * 10} for row in rows]
    return write_jsonl(folder / "grounding.jsonl", grounding), write_jsonl(folder / "vqa.jsonl", vqa * 25)


def test_sft_mixes_by_weight_and_logs_each_sources_loss(tiny_model_dir, mixed_files, tmp_path):
    grounding, vqa = mixed_files
    result = run_script(
        "sft.py", "--config", "configs/tiny_cpu.yaml", "--model_name_or_path", tiny_model_dir,
        "--train_dataset_name", grounding, vqa, "--train_dataset_weights", 0.8, 0.2, "--output_dir", tmp_path / "mixed",
        "--max_image_side", 56, "--max_steps", 4, "--logging_steps", 4, "--padding", "packed", "--save_strategy", "no",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    counts = dict(re.findall(r"(\w+)\.jsonl: (\d+) rows per epoch", result.stderr))
    assert "training mix (first_exhausted)" in result.stderr
    # first_exhausted: the epoch ends with the grounding file (the more likely one) used up.
    assert int(counts["grounding"]) == 400
    total = int(counts["grounding"]) + int(counts["vqa"])
    share, sampling_error = int(counts["vqa"]) / total, math.sqrt(0.2 * 0.8 / total)
    assert abs(share - 0.2) < 3 * sampling_error, (counts, sampling_error)
    with open(tmp_path / "cpu_mixed" / "trainer_state.json") as f:
        (logged,) = [entry for entry in json.load(f)["log_history"] if "loss" in entry]
    assert logged["loss_grounding"] > 0 and logged["loss_vqa"] > 0


class Losses(SourceLosses):
    source_names = ["grounding", "vqa"]


def test_source_losses_split_the_answer_token_loss_by_source():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=generator)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 2, 7, 9]])
    source_ids = torch.tensor([[0] * 6, [1] * 6])
    losses = Losses()
    losses.add_source_losses(logits, labels, source_ids)
    # Token t predicts label t + 1: the first row learns 3 labels, the second 5.
    expected = [F_ce(logits[0, 1:4], labels[0, 2:5]), F_ce(logits[1, 0:5], labels[1, 1:6])]
    assert losses.source_token_counts.tolist() == [3, 5]
    assert (losses.source_loss_sums / losses.source_token_counts).tolist() == pytest.approx(expected)
    # Together they are the model's loss: the mean over every answer token of the batch.
    overall = F_ce(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert float(losses.source_loss_sums.sum() / 8) == pytest.approx(overall)


def F_ce(logits, labels):
    return float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX))


@pytest.mark.parametrize("padding", ["longest", "max_length", "packed"])
def test_collator_carries_each_rows_source_beside_its_tokens(processor, collator_rows, padding):
    collator = GroundingCollator(processor, max_seq_length=1024, padding=padding)
    rows = [{**row, "source": number % 2} for number, row in enumerate(collator_rows[:3])]
    batch = collator(rows)
    assert batch[SOURCE_IDS].shape == batch["labels"].shape
    lengths = [len(collator.encode(row)["input_ids"]) for row in rows]
    if padding == "packed":
        assert batch[SOURCE_IDS][0].tolist() == [0] * lengths[0] + [1] * lengths[1] + [0] * lengths[2]
    else:
        for number, length in enumerate(lengths):
            assert batch[SOURCE_IDS][number, :length].tolist() == [number % 2] * length
    assert SOURCE_IDS not in collator(collator_rows[:3])  # a single file's rows: the batch is as before
