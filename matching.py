"""One-to-one matching of predicted boxes to true boxes, shared by scoring (scoring.py) and the GRPO list
reward (rewards.py), so that evaluation and RL agree on what a match is.

Matching is class-agnostic: the query names what to find, so only the boxes count, not their labels.
"""

import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou

# A predicted box this close to an earlier one of the same answer is the same object written twice.
DUPLICATE_IOU = 0.9


def iou_matrix(predicted, true) -> torch.Tensor:
    """IoU of every predicted box (rows) with every true box (columns), float64; a predicted box that is not
    a box in our format (x2 <= x1 or y2 <= y1) overlaps nothing."""
    if not predicted or not true:
        return torch.zeros(len(predicted), len(true), dtype=torch.float64)
    predicted = torch.tensor(predicted, dtype=torch.float64)
    ious = box_iou(predicted, torch.tensor(true, dtype=torch.float64)).nan_to_num(0.0)
    inverted = (predicted[:, 2] <= predicted[:, 0]) | (predicted[:, 3] <= predicted[:, 1])
    ious[inverted] = 0.0
    return ious


def match_boxes(predicted, true, threshold: float) -> list[tuple[int, int, float]]:
    """(predicted index, true index, IoU) of the one-to-one pairs that reach `threshold` (a pair needs IoU > 0
    even at threshold 0). Hungarian matching maximises the summed IoU of pairs at or above the threshold, so
    a pair under it cannot take a box from a pair above it, and no box is matched twice (greedy matching
    can pair a box with its second-best partner and leave a better pair unmatched)."""
    ious = iou_matrix(predicted, true)
    ious[ious < threshold] = 0.0
    if ious.numel() == 0:
        return []
    rows, columns = linear_sum_assignment(ious.numpy(), maximize=True)
    return [(int(i), int(j), float(ious[i, j])) for i, j in zip(rows, columns) if ious[i, j] > 0]


def duplicate_count(predicted) -> int:
    """Predicted boxes with IoU >= DUPLICATE_IOU to an earlier predicted box of the same answer."""
    ious = iou_matrix(predicted, predicted)
    return sum(bool((ious[index, :index] >= DUPLICATE_IOU).any()) for index in range(len(predicted)))
