"""The GRPO rewards on a table of completions, against IoUs worked out by hand."""

import pytest

from rewards import format_reward, iou_reward, reward_functions

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
    with pytest.raises(ValueError, match=r"'giou'.*valid names: \['format', 'iou'\]"):
        reward_functions(["iou", "giou"])
