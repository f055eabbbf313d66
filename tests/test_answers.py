"""Answer kinds, list answers and their parser (answers.py), on hand-made model outputs."""

import pytest

from answers import BOX, BOXES, TEXT, answer_kind, build_messages, format_boxes_answer, parse_boxes, read_answer_boxes

A = {"bbox_2d": [1.0, 2.0, 30.0, 40.0], "label": "red circle"}
B = {"bbox_2d": [50.0, 60.0, 70.0, 80.0], "label": "red circle"}


@pytest.mark.parametrize(
    "response, kind",
    [
        ('{"bbox_2d": [1, 2, 3, 4]}', BOX),
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]', BOXES),
        ("[]", BOXES),
        ("dark red", TEXT),
        ("12", TEXT),
        # Broken box answers stay box answers, so reading them fails loudly instead of training them as text.
        ("[1, 2]", BOXES),
        ('{"answer": "yes"}', BOX),
        (" not json", TEXT),
    ],
)
def test_answer_kind_is_read_from_the_response(response, kind):
    assert answer_kind(response) == kind


def test_only_single_box_questions_get_the_tutorials_instruction():
    assert "coordinate boxes" in build_messages("Where is the sign?")[0]["content"][1]["text"]
    for kind in (BOXES, TEXT):
        assert build_messages(" Locate every sign. ", kind)[0]["content"][1]["text"] == "Locate every sign."


@pytest.mark.parametrize(
    "text, objects, well_formed",
    [
        ("[]", [], True),
        (format_boxes_answer([A, B]), [A, B], True),
        ('```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "red circle"}]\n```', [A], True),
        ('{"label": "red circle", "bbox_2d": ["1", "2", 30, "40"]}', [A], True),
        # Cut off by max_new_tokens: the finished box is kept, the answer counted as malformed.
        ('[{"bbox_2d": [1, 2, 30, 40], "label": "red circle"}, {"bbox_2d": [50, 60', [A], False),
        # Duplicates are kept for scoring to count.
        (format_boxes_answer([A, A]), [A, A], True),
        ("There is no such object.", [], False),
        ('[{"bbox_2d": [1, 2, 30]}, {"bbox_2d": [1, 2, 30, 40], "label": "red circle"}]', [A], False),
    ],
)
def test_parse_boxes(text, objects, well_formed):
    assert parse_boxes(text) == (objects, well_formed)


@pytest.mark.parametrize(
    "answer, message",
    [
        ("{", "not a JSON list"),
        ('{"bbox_2d": [1, 2, 3, 4]}', "not a JSON list"),
        ('[{"bbox_2d": [1, 2, 3]}]', "object 1"),
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": 7}]', "object 2"),
    ],
)
def test_bad_list_answers_are_named(answer, message):
    with pytest.raises(ValueError, match=message):
        read_answer_boxes(answer)


def test_list_answer_round_trip_rounds_to_integers():
    objects = read_answer_boxes(format_boxes_answer([{"bbox_2d": [1.4, 2.6, 30, 40], "label": "x"}]))
    assert objects == [{"bbox_2d": [1.0, 3.0, 30.0, 40.0], "label": "x"}]
