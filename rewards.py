"""Rewards for GRPO on grounding, in trl's reward-function form: `f(completions, **columns) -> list[float]`.

trl passes each completion as `[{"role": "assistant", "content": text}]` and every other dataset column
as a keyword argument, one value per completion; here `solution` is the truth in the model frame, in the
family's answer coordinates (model_families.box_to_answer), so it compares with the completion as written:
one box for a single-box row, a list of boxes for a list row (`kind` says which, answers.BOX or BOXES). A
reward returns None for a row of the other kind, which trl leaves out of that reward.
"""

import json

from answers import BOX, BOXES, parse_bbox, parse_boxes, valid_box_values
from matching import match_boxes
from utils import box_ious


def completion_text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def score_rows(reward_kind, score, completions, truths, kind) -> list[float | None]:
    """score(text, truth) for each row of reward_kind, None for the others; rows without a `kind` column are
    single boxes (the data before list rows)."""
    kinds = kind or [BOX] * len(completions)
    return [
        score(completion_text(completion), truth) if row_kind == reward_kind else None
        for completion, truth, row_kind in zip(completions, truths, kinds)
    ]


def iou_reward(completions, solution, kind=None, **kwargs) -> list[float | None]:
    """IoU of the first box the project's parser finds with the true box: 0 when none parses or it is inverted.
    Unlike the token loss of SFT, a box one pixel off earns almost full reward."""
    return score_rows(BOX, lambda text, box: box_ious([parse_bbox(text)], [box])[0], completions, solution, kind)


def is_single_box_answer(text: str) -> bool:
    """Exactly the trained answer `{"bbox_2d": [4 numbers]}`: no prose, fence, list or second box around it."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(answer, dict) and list(answer) == ["bbox_2d"] and valid_box_values(answer["bbox_2d"])


def format_reward(completions, kind=None, **kwargs) -> list[float | None]:
    """1 for a completion that is exactly one `{"bbox_2d": [x1, y1, x2, y2]}`, else 0."""
    return score_rows(BOX, lambda text, _: float(is_single_box_answer(text)), completions, [None] * len(completions), kind)


def list_iou(text: str, true_boxes) -> float:
    """The summed IoU of the boxes matched one-to-one (matching.match_boxes, the pairing scoring.py counts)
    over the larger of the numbers of predicted and true boxes: each missing box and each extra one (a
    duplicate too) costs a share. An empty truth answered with no box earns 1; any box then earns 0."""
    predicted = [item["bbox_2d"] for item in parse_boxes(text)[0]]
    largest = max(len(predicted), len(true_boxes))
    if not largest:
        return 1.0
    return sum(iou for _, _, iou in match_boxes(predicted, true_boxes, 0.0)) / largest


def list_iou_reward(completions, solution, kind=None, **kwargs) -> list[float | None]:
    """list_iou of each list row's completion with its true boxes."""
    return score_rows(BOXES, list_iou, completions, solution, kind)


def is_list_answer(text: str) -> bool:
    """Exactly the trained list answer: a JSON list of `{"bbox_2d": [4 numbers], "label": str}`, or `[]`."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(answer, list) and all(
        isinstance(item, dict) and sorted(item) == ["bbox_2d", "label"] and valid_box_values(item["bbox_2d"])
        and isinstance(item["label"], str)
        for item in answer
    )  # fmt: skip


def list_format_reward(completions, kind=None, **kwargs) -> list[float | None]:
    """1 for a completion that is exactly a list answer (no fence, prose or truncation), else 0."""
    return score_rows(BOXES, lambda text, _: float(is_list_answer(text)), completions, [None] * len(completions), kind)


REWARD_FUNCTIONS = {
    "iou": iou_reward, "format": format_reward, "list_iou": list_iou_reward, "list_format": list_format_reward,
}  # fmt: skip
# The rows each reward scores: a training set needs a reward for each kind of row it holds.
REWARD_KINDS = {"iou": BOX, "format": BOX, "list_iou": BOXES, "list_format": BOXES}


def reward_functions(names: list[str]) -> list:
    """The reward functions for the config's `reward_funcs` names; an unknown name lists the valid ones."""
    if not names or any(name not in REWARD_FUNCTIONS for name in names):
        valid = sorted(REWARD_FUNCTIONS)
        raise ValueError(f"reward_funcs: {names!r} is not a list of reward names; valid names: {valid}")
    return [REWARD_FUNCTIONS[name] for name in names]


def check_rewards_cover(names: list[str], kinds, path: str) -> None:
    """Every kind of row in the training set needs a reward: rows no reward scores would teach nothing."""
    unscored = sorted(set(kinds) - {REWARD_KINDS[name] for name in names})
    if unscored:
        add = [name for name, reward_kind in REWARD_KINDS.items() if reward_kind in unscored]
        raise ValueError(f"{path} holds {'/'.join(unscored)} rows that none of reward_funcs {names} scores: add {add}")
