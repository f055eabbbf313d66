"""A confidence for every predicted box, from the probabilities the model gave its own coordinate tokens.

Generation keeps each generated token's log-probability (`compute_transition_scores`); a box's confidence
is a function (CONFIDENCE_RULES) of the log-probabilities of the tokens that write its four numbers, so
the words and brackets around them, which the model writes with near certainty, do not dilute it.
"""

import math

from answers import box_number_spans

# Candidates, compared on a validation split in docs/confidence.md.
CONFIDENCE_RULES = {
    "mean": lambda logprobs: math.exp(sum(logprobs) / len(logprobs)),  # geometric mean of the token probabilities
    "min": lambda logprobs: math.exp(min(logprobs)),  # the least sure token
    "product": lambda logprobs: math.exp(sum(logprobs)),  # the probability of the whole box string
}
DEFAULT_CONFIDENCE_RULE = "mean"


def token_starts(tokenizer, token_ids) -> list[int]:
    """The character offset at which each token's text begins in decode(token_ids, skip_special_tokens=True)."""
    return [len(tokenizer.decode(token_ids[:index], skip_special_tokens=True)) for index in range(len(token_ids))]


def box_confidences(tokenizer, token_ids, token_logprobs, kind, rule=DEFAULT_CONFIDENCE_RULE) -> list[float]:
    """One confidence in [0, 1] per box of the decoded answer, in parse order (answers.box_number_spans).

    token_ids / token_logprobs: the generated tokens of one sample and their log-probabilities."""
    token_ids, token_logprobs = list(token_ids), [float(v) for v in token_logprobs]
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    starts = token_starts(tokenizer, token_ids)
    ends = starts[1:] + [len(text)]
    confidences = []
    for number_spans in box_number_spans(text, kind):
        logprobs = [
            logprob
            for start, end, logprob in zip(starts, ends, token_logprobs)
            if end > start and any(start < span_end and span_start < end for span_start, span_end in number_spans)
        ]
        confidences.append(CONFIDENCE_RULES[rule](logprobs) if logprobs else 0.0)
    return confidences
