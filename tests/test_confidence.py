"""Box confidences from token log-probabilities (confidence.py), against probabilities written by hand."""

import json
import math

import pytest
from PIL import Image
import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen2_5_VLForConditionalGeneration

from answers import BOX, BOXES
from conftest import run_script
from confidence import CONFIDENCE_RULES, box_confidences, token_pieces, reliability, selective_accuracy


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def answer_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def confidences(tokenizer, ids, logprobs, kind, rule="mean"):
    return box_confidences(token_pieces(tokenizer, ids), logprobs, kind, rule)


def hand_logprobs(tokenizer, ids, probability_of_digit):
    """Every digit token gets the probability its function gives, every other token probability 1."""
    return [math.log(probability_of_digit(tokenizer.decode([token]))) if tokenizer.decode([token]).isdigit() else 0.0 for token in ids]


def test_each_box_gets_the_probabilities_of_its_own_numbers(tokenizer):
    text = '[{"bbox_2d": [12, 34, 56, 78], "label": "a"}, {"bbox_2d": [9, 9, 9, 9], "label": "b"}, {"bbox_2d": [1, 2'
    ids = answer_ids(tokenizer, text)
    # Digits of the first box at 0.8, of the second at 0.5; the unfinished third box is not a box.
    logprobs = hand_logprobs(tokenizer, ids, lambda digit: 0.5 if digit == "9" else 0.8)
    assert confidences(tokenizer, ids, logprobs, BOXES, "mean") == pytest.approx([0.8, 0.5])
    assert confidences(tokenizer, ids, logprobs, BOXES, "product") == pytest.approx([0.8**8, 0.5**4])
    assert confidences(tokenizer, ids, logprobs, BOXES, "min") == pytest.approx([0.8, 0.5])
    # Every digit but each number's last: the tens of the first box, nothing of the one-digit second box.
    assert confidences(tokenizer, ids, logprobs, BOXES, "coarse") == pytest.approx([0.8**4, 1.0])


def test_single_box_and_no_box(tokenizer):
    ids = answer_ids(tokenizer, '{"bbox_2d": [10, 20, 30, 40]}')
    logprobs = hand_logprobs(tokenizer, ids, lambda digit: {"1": 0.2, "2": 0.4}.get(digit, 1.0))
    assert confidences(tokenizer, ids, logprobs, BOX, "min") == pytest.approx([0.2])
    assert confidences(tokenizer, ids, logprobs, BOX, "mean") == pytest.approx([(0.2 * 0.4) ** (1 / 8)])
    assert confidences(tokenizer, answer_ids(tokenizer, "[]"), [0.0, 0.0, 0.0], BOXES) == []


def test_confidences_from_hand_written_logits_through_compute_transition_scores(tiny_model_dir, tokenizer):
    """The chain generation uses: per-step logits -> log-softmax of the chosen tokens -> box confidence."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    ids = answer_ids(tokenizer, '{"bbox_2d": [1, 2, 3, 4]}')
    vocab = model.config.get_text_config().vocab_size
    first_number_step = next(step for step, token in enumerate(ids) if "[" in tokenizer.decode([token])) + 1
    scores, expected_digit_probabilities = [], []
    for step, token in enumerate(ids):
        logits = torch.zeros(1, vocab)
        logits[0, token] = 2.0 + step % 3  # the chosen token leads by a margin we know
        scores.append(logits)
        if step >= first_number_step and tokenizer.decode([token]).isdigit():  # not the 2 of "bbox_2d"
            expected_digit_probabilities.append(math.exp(logits[0, token]) / (math.exp(logits[0, token]) + vocab - 1))
    sequences = torch.tensor([[0, 0] + ids])  # two prompt tokens, then the answer
    model.generation_config = GenerationConfig()
    logprobs = model.compute_transition_scores(sequences, tuple(scores), normalize_logits=True)[0]
    expected = math.prod(expected_digit_probabilities) ** (1 / len(expected_digit_probabilities))
    assert confidences(tokenizer, ids, logprobs, BOX, "mean") == pytest.approx([expected], rel=1e-5)


def test_rules_are_probabilities():
    for rule in CONFIDENCE_RULES.values():
        assert 0.0 <= rule([[-3.0, -0.1], [0.0], [-0.2], [-1.0, -0.5]]) <= 1.0


def test_selective_accuracy_keeps_the_most_confident_answers():
    confidences = [0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.4]
    correct = [True, False, True, False, False, True, True, False]
    table = selective_accuracy(confidences, correct)
    assert [(row["count"], row["accuracy"]) for row in table] == [(2, 1.0), (4, 0.75), (6, 0.5), (8, 0.5)]


def test_reliability_bins_and_expected_calibration_error_by_hand():
    """Half the answers said 0.95 and half of those were right; the other half said 0.15 and none was:
    ECE = 0.5 * |0.95 - 0.5| + 0.5 * |0.15 - 0| = 0.3."""
    ece, bins = reliability([0.95, 0.95, 0.15, 0.15], [True, False, False, False])
    assert ece == pytest.approx(0.3)
    filled = [value for b in bins if b["count"] for value in (b["low"], b["count"], b["confidence"], b["accuracy"])]
    assert filled == pytest.approx([0.1, 2, 0.15, 0.0, 0.9, 2, 0.95, 0.5])


def test_pieces_rebuild_the_decoded_answer(tokenizer):
    ids = answer_ids(tokenizer, '[{"bbox_2d": [12, 34, 56, 78], "label": "été"}]')
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids) and pieces[-1] == ""
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_plot_script_tables_single_boxes_and_list_boxes(tmp_path):
    """plot_confidence.py on records shaped as infer.py writes them: 8 single-box answers (one unparsed, one from
    a failed image: both left out) and a list row's boxes, right when matched at IoU 0.5."""
    single = [(0.9, 0.8), (0.8, 0.7), (0.7, 0.2), (0.6, 0.9), (0.4, 0.1), (0.3, 0.6), (0.2, 0.3), (0.1, 0.4)]
    records = [{"gt_bbox": [0, 0, 1, 1], "pred_bbox": [0, 0, 1, 1], "confidence": c, "iou": iou, "error": None} for c, iou in single]
    records += [
        {"gt_bbox": [0, 0, 1, 1], "pred_bbox": None, "confidence": None, "iou": 0.0, "error": None},
        {"gt_bbox": [0, 0, 1, 1], "pred_bbox": None, "confidence": None, "iou": None, "error": "cannot read image"},
        {"gt_boxes": [{}, {}], "matches": [[1, 0, 0.7]], "error": None,
         "pred_boxes": [{"confidence": 0.95}, {"confidence": 0.35}, {"confidence": 0.55}]},
    ]  # fmt: skip
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "predictions.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    run_script("scripts/plot_confidence.py", eval_dir, "--output_dir", tmp_path / "out", "--name", "t")
    table = (tmp_path / "out" / "confidence_t.md").read_text()
    # Single boxes by confidence: hits (IoU >= 0.5) are 1 1 0 1 0 1 0 0 -> the top 2, 4, 6, 8 hold 2, 3, 4, 4 hits.
    for row in ("| 25% | 2 | 1.000 |", "| 50% | 4 | 0.750 |", "| 75% | 6 | 0.667 |", "| 100% | 8 | 0.500 |"):
        assert row in table.split("**list boxes**")[0], table
    # List boxes by confidence: 0.95 (unmatched), 0.55 (unmatched), 0.35 (matched).
    assert "| 100% | 3 | 0.333 |" in table.split("**list boxes**")[1] and "| 25% | 1 | 0.000 |" in table, table
    assert Image.open(tmp_path / "out" / "confidence_t.png").size[0] == 2 * (300 + 2 * 40)  # one panel each
