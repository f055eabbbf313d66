"""Rewards for GRPO on grounding, in trl's reward-function form: `f(completions, **columns) -> list[float]`.

trl passes each completion as `[{"role": "assistant", "content": text}]` and every other dataset column
as a keyword argument, one value per completion; here `solution` is the true box in the model frame, in the
family's answer coordinates (model_families.box_to_answer), so it compares with the completion as written.
"""

import json

from answers import parse_bbox, valid_box_values
from utils import box_ious


def completion_text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def iou_reward(completions, solution, **kwargs) -> list[float]:
    """IoU of the first box the project's parser finds with the true box: 0 when none parses or it is inverted.
    Unlike the token loss of SFT, a box one pixel off earns almost full reward."""
    return box_ious([parse_bbox(completion_text(completion)) for completion in completions], solution)


def is_single_box_answer(text: str) -> bool:
    """Exactly the trained answer `{"bbox_2d": [4 numbers]}`: no prose, fence, list or second box around it."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(answer, dict) and list(answer) == ["bbox_2d"] and valid_box_values(answer["bbox_2d"])


def format_reward(completions, **kwargs) -> list[float]:
    """1 for a completion that is exactly one `{"bbox_2d": [x1, y1, x2, y2]}`, else 0."""
    return [float(is_single_box_answer(completion_text(completion))) for completion in completions]


REWARD_FUNCTIONS = {"iou": iou_reward, "format": format_reward}


def reward_functions(names: list[str]) -> list:
    """The reward functions for the config's `reward_funcs` names; an unknown name lists the valid ones."""
    if not names or any(name not in REWARD_FUNCTIONS for name in names):
        valid = sorted(REWARD_FUNCTIONS)
        raise ValueError(f"reward_funcs: {names!r} is not a list of reward names; valid names: {valid}")
    return [REWARD_FUNCTIONS[name] for name in names]
