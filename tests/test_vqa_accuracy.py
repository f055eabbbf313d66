"""VQA accuracy against hand-computed cases, normalisation included."""

import pytest

from vqa_accuracy import normalize_answer, score_text_answers, vqa_accuracy


@pytest.mark.parametrize(
    "answer, normalised",
    [
        ("  Coca Cola.\n", "coca cola"),  # whitespace, case, a final period
        ("2.5", "2.5"),  # a period before a digit stays
        ("The Red Square", "red square"),  # articles go
        ("an apple", "apple"),
        ("Two", "2"),  # number words become digits
        ("none", "0"),
        ("dont", "don't"),  # contractions get their apostrophes back
        ("couldnt've", "couldn't've"),
        ("hello, world!", "hello world"),  # a mark touching a space is removed
        ("red-white", "red white"),  # elsewhere it becomes a space
        ("1,000 yes/no", "1000 yesno"),  # a comma between digits: every mark is removed
        ("well were", "well were"),  # common words that look like contractions are left alone
    ],
)
def test_normalisation(answer, normalised):
    assert normalize_answer(answer) == normalised


# Ten humans; k of them gave the prediction. Leaving out one of the k leaves k - 1 matches, one of the
# others leaves k: accuracy = (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10.
@pytest.mark.parametrize(
    "matching, expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],  # e.g. k=2: (2 * 1/3 + 8 * 2/3) / 10
)
def test_accuracy_by_number_of_humans_agreeing(matching, expected):
    answers = ["stop"] * matching + ["go"] * (10 - matching)
    assert vqa_accuracy("Stop.", answers) == pytest.approx(expected)


def test_normalisation_applies_to_human_answers_too():
    answers = ["Two", "2", "two.", "the two"] + ["three"] * 6  # four spellings of "2"
    assert vqa_accuracy("2", answers) == pytest.approx(1.0)
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    assert vqa_accuracy("4", answers) == 0.0


def test_scoring_records_keep_the_raw_answer_and_skip_failed_images():
    rows = [
        {"image": ["a.jpg"], "user": "what colour?", "assistant": "red", "answers": ["red"] * 2 + ["blue"] * 8},
        {"image": ["b.jpg"], "user": "what shape?", "assistant": "circle"},  # no answers: the response, ten times
        {"image": ["c.jpg"], "user": "how many?", "assistant": "2"},
    ]
    predictions = [
        {"raw_output": "Red.", "error": None},
        {"raw_output": "a circle", "error": None},
        {"raw_output": None, "error": "cannot read image c.jpg"},
    ]
    records, metrics = score_text_answers(rows, predictions)
    assert [record["raw_output"] for record in records] == ["Red.", "a circle", None]
    assert [record["vqa_accuracy"] for record in records] == [pytest.approx(0.6), 1.0, None]
    assert metrics == {"vqa_accuracy": pytest.approx(0.8), "vqa_num_samples": 2, "vqa_failed_samples": 1}
