"""The GRPO rewards on a table of completions, against IoUs worked out by hand."""

import pytest

from answers import BOX, BOXES
from rewards import format_reward, iou_reward, list_format_reward, list_iou_reward, reward_functions

TRUE_BOX = [10, 10, 30, 30]  # area 400
TABLE = [
    # name, completion text, IoU reward, format reward
    ("perfect", '{"bbox_2d": [10, 10, 30, 30]}', 1.0, 1.0),
    ("partial overlap", '{"bbox_2d": [20, 10, 40, 30]}', 200 / 600, 1.0),  # overlap 10x20, union 400+400-200
    ("inside", '{"bbox_2d": [15, 15, 25, 25]}', 100 / 400, 1.0),
    ("no overlap", '{"bbox_2d": [50, 50, 60, 60]}', 0.0, 1.0),
    ("inverted", '{"bbox_2d": [30, 30, 10, 10]}', 0.0, 1.0),
    ("unparseable", "the red square, top left", 0.0, 0.0),
    ("three numbers", '{"bbox_2d": [10, 10, 30]}', 0.0, 0.0),
    ("two boxes, first counts", '[{"bbox_2d": [10, 10, 30, 30]}, {"bbox_2d": [50, 50, 60, 60]}]', 1.0, 0.0),
    ("extra prose", 'Here it is: {"bbox_2d": [10, 10, 30, 30]}', 1.0, 0.0),
    ("json fence", '```json\n{"bbox_2d": [20, 10, 40, 30]}\n```', 200 / 600, 0.0),
    ("extra key", '{"bbox_2d": [10, 10, 30, 30], "label": "square"}', 1.0, 0.0),
    ("float coordinates", '{"bbox_2d": [10.0, 10.0, 30.0, 30.0]}', 1.0, 1.0),
    ("empty", "", 0.0, 0.0),
]


@pytest.mark.parametrize("name, text, iou, formatted", TABLE, ids=[row[0] for row in TABLE])
def test_rewards_table(name, text, iou, formatted):
    completions = [[{"role": "assistant", "content": text}]]  # trl's conversational form
    assert iou_reward(completions, solution=[TRUE_BOX]) == pytest.approx([iou])
    assert format_reward(completions, solution=[TRUE_BOX]) == [formatted]


def test_each_completion_meets_its_own_box():
    completions = [[{"role": "assistant", "content": '{"bbox_2d": [0, 0, 10, 10]}'}]] * 2
    assert iou_reward(completions, solution=[[0, 0, 10, 10], [0, 0, 10, 20]]) == pytest.approx([1.0, 0.5])


def test_unknown_reward_name_lists_valid_ones():
    assert reward_functions(["iou", "format"]) == [iou_reward, format_reward]
    with pytest.raises(ValueError, match=r"'giou'.*valid names: \['format', 'iou', 'list_format', 'list_iou'\]"):
        reward_functions(["iou", "giou"])


TRUE_BOXES = [[10, 10, 30, 30], [50, 50, 70, 70]]
FIRST, SECOND = '{"bbox_2d": [10, 10, 30, 30], "label": "a"}', '{"bbox_2d": [50, 50, 70, 70], "label": "b"}'
LIST_TABLE = [
    # name, completion text, true boxes, list IoU reward (matched IoU / max(#predicted, #true)), list format reward
    ("both found", f"[{FIRST}, {SECOND}]", TRUE_BOXES, 1.0, 1.0),
    ("any order", f"[{SECOND}, {FIRST}]", TRUE_BOXES, 1.0, 1.0),
    ("one missing", f"[{FIRST}]", TRUE_BOXES, 1 / 2, 1.0),
    ("one extra", f'[{FIRST}, {SECOND}, {{"bbox_2d": [90, 90, 99, 99], "label": "c"}}]', TRUE_BOXES, 2 / 3, 1.0),
    ("duplicate", f"[{FIRST}, {FIRST}, {SECOND}]", TRUE_BOXES, 2 / 3, 1.0),
    ("only duplicates", f"[{FIRST}, {FIRST}]", TRUE_BOXES, 1 / 2, 1.0),
    ("partial overlap, no label", f'[{{"bbox_2d": [20, 10, 40, 30]}}, {SECOND}]', TRUE_BOXES, (200 / 600 + 1) / 2, 0.0),
    ("inverted", '[{"bbox_2d": [30, 30, 10, 10], "label": "a"}]', TRUE_BOXES[:1], 0.0, 1.0),
    ("empty truth, empty answer", "[]", [], 1.0, 1.0),
    ("empty truth, a box", f"[{FIRST}]", [], 0.0, 1.0),
    ("empty answer", "[]", TRUE_BOXES, 0.0, 1.0),
    ("json fence", f"```json\n[{FIRST}, {SECOND}]\n```", TRUE_BOXES, 1.0, 0.0),
    ("cut off", f'[{FIRST}, {{"bbox_2d": [50, 5', TRUE_BOXES, 1 / 2, 0.0),  # the finished box counts
    ("prose, empty truth", "There is none.", [], 1.0, 0.0),  # no box is right; the form is the format reward's
    ("one object, not a list", FIRST, TRUE_BOXES[:1], 1.0, 0.0),
]


@pytest.mark.parametrize("name, text, true_boxes, iou, formatted", LIST_TABLE, ids=[row[0] for row in LIST_TABLE])
def test_list_rewards_table(name, text, true_boxes, iou, formatted):
    completions = [[{"role": "assistant", "content": text}]]
    assert list_iou_reward(completions, solution=[true_boxes], kind=[BOXES]) == pytest.approx([iou])
    assert list_format_reward(completions, solution=[true_boxes], kind=[BOXES]) == [formatted]


def test_each_reward_scores_its_own_kind_of_row():
    """In a batch mixing a single-box row and a list row, each reward scores its rows and gives None (trl's
    "not applicable") for the others."""
    completions = [[{"role": "assistant", "content": text}] for text in ('{"bbox_2d": [10, 10, 30, 30]}', f"[{FIRST}]")]
    columns = {"solution": [TRUE_BOX, TRUE_BOXES[:1]], "kind": [BOX, BOXES]}
    assert iou_reward(completions, **columns) == [1.0, None] and format_reward(completions, **columns) == [1.0, None]
    assert list_iou_reward(completions, **columns) == [None, 1.0]
    assert list_format_reward(completions, **columns) == [None, 1.0]
