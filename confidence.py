"""A confidence for every predicted box, from the probabilities the model gave its own coordinate tokens.

Generation keeps each generated token's log-probability (`compute_transition_scores`); a box's confidence
is a function (CONFIDENCE_RULES) of the log-probabilities of the tokens that write its four numbers, so
the words and brackets around them, which the model writes with near certainty, do not dilute it.
"""

import math

import torch
from torchmetrics.functional.classification import binary_calibration_error

from answers import box_number_spans

# Candidates, compared on a validation split in docs/confidence.md. Each takes the log-probabilities of the
# tokens of the box's four numbers, one list per number.
CONFIDENCE_RULES = {
    # the geometric mean of every digit's probability
    "mean": lambda numbers: math.exp(sum(map(sum, numbers)) / sum(map(len, numbers))),
    # the least sure digit
    "min": lambda numbers: math.exp(min(min(number) for number in numbers)),
    # the probability of the whole box string
    "product": lambda numbers: math.exp(sum(map(sum, numbers))),
    # the probability of every digit but each number's last (Qwen writes one token per digit): the box's
    # position to ten units, without the last pixel, which no answer can be sure of
    "coarse": lambda numbers: math.exp(sum(sum(number[:-1]) for number in numbers)),
}
DEFAULT_CONFIDENCE_RULE = "coarse"  # chosen on the demo's validation split: docs/confidence.md


def token_pieces(tokenizer, token_ids) -> list[str]:
    """The text each generated token adds to decode(token_ids, skip_special_tokens=True) ("" for special
    tokens): what an OpenAI-compatible server returns as its logprobs' tokens. A character split over
    several byte tokens is given to the token that completes it."""
    pieces, emitted = [], ""
    for end in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:end], skip_special_tokens=True)
        if text.endswith("\ufffd") and end < len(token_ids):  # an unfinished UTF-8 character
            pieces.append("")
            continue
        pieces.append(text[len(emitted) :])
        emitted = text
    return pieces


def box_confidences(pieces, token_logprobs, kind, rule=DEFAULT_CONFIDENCE_RULE) -> list[float]:
    """One confidence in [0, 1] per box of the answer "".join(pieces), in parse order (answers.box_number_spans):
    the rule applied to the log-probabilities of the tokens that overlap each of the box's four numbers."""
    token_logprobs = [float(v) for v in token_logprobs]
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + len(piece))
    confidences = []
    for number_spans in box_number_spans("".join(pieces), kind):
        numbers = [
            [logprob for start, end, logprob in zip(starts, starts[1:], token_logprobs) if start < span_end and span_start < end]
            for span_start, span_end in number_spans
        ]
        confidences.append(CONFIDENCE_RULES[rule](numbers) if all(numbers) else 0.0)
    return confidences


def abstain_below(predictions, min_confidence: float) -> tuple[int, int]:
    """Drop every predicted box whose confidence is under min_confidence, in place: a single-box answer
    becomes an abstention ("abstained": True, no box), a list answer loses those boxes ("abstained_boxes").
    Returns (answers abstained, list boxes dropped), for metrics.json: nothing is dropped silently."""
    answers, boxes = 0, 0
    for prediction in predictions:
        if prediction.get("pred_boxes") is not None:
            kept = [item for item in prediction["pred_boxes"] if item["confidence"] is None or item["confidence"] >= min_confidence]
            prediction["abstained_boxes"] = len(prediction["pred_boxes"]) - len(kept)
            prediction["pred_boxes"] = kept
            boxes += prediction["abstained_boxes"]
        elif prediction.get("confidence") is not None and prediction["confidence"] < min_confidence:
            prediction.update(pred_bbox=None, abstained=True)
            answers += 1
    return answers, boxes


# ---------------------------------------------------------------- what the confidences are worth
COVERAGES = (0.25, 0.5, 0.75, 1.0)
RELIABILITY_BINS = 10


def selective_accuracy(confidences, correct, coverages=COVERAGES) -> list[dict]:
    """Accuracy of the most confident fraction of answers, for each coverage: what answering only when
    sure buys. confidences and correct (bools) are per answer (or per box)."""
    ranked = [hit for _, hit in sorted(zip(confidences, correct), key=lambda pair: -pair[0])]
    rows = []
    for coverage in coverages:
        kept = ranked[: max(1, round(coverage * len(ranked)))] if ranked else []
        rows.append({"coverage": coverage, "count": len(kept), "accuracy": sum(kept) / len(kept) if kept else None})
    return rows


def reliability(confidences, correct, bins=RELIABILITY_BINS) -> tuple[float | None, list[dict]]:
    """Expected calibration error (torchmetrics' binary ECE, L1) and the reliability diagram's bins: per
    equal-width confidence bin, its count, mean confidence and accuracy."""
    if not confidences:
        return None, []
    scores, targets = torch.tensor(confidences, dtype=torch.float64), torch.tensor(correct, dtype=torch.long)
    ece = float(binary_calibration_error(scores, targets, n_bins=bins, norm="l1"))
    # torchmetrics' bins: (low, high] by bucketize on the edges, a confidence of 0 in the first bin.
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = (torch.bucketize(scores, edges, right=False) - 1).clamp(min=0)
    table = []
    for number in range(bins):
        members = index == number
        count = int(members.sum())
        table.append(
            {
                "low": float(edges[number]),
                "high": float(edges[number + 1]),
                "count": count,
                "confidence": float(scores[members].mean()) if count else None,
                "accuracy": float(targets[members].double().mean()) if count else None,
            }
        )
    return ece, table
