"""Prompts and answer texts, shared by conversion, training, RL and inference.

A row's response says what it trains and how it is scored (`answer_kind`, from its first character):
  box    '{"bbox_2d": [x1, y1, x2, y2]}'   one box, the tutorial's TextVQA grounding;
  boxes  '[{"bbox_2d": [...], "label": "red circle"}, ...]' or '[]'   every matching object, in
         Qwen's own list format; the empty list answers "no such object";
  text   anything else: a plain answer (general question answering), trained as written.
Boxes in a dataset row are in original pixels; in the model's answers, in the family's frame.
"""

import json
import math
import re

BOX, BOXES, TEXT = "box", "boxes", "text"
# The tutorial's instruction, appended to every single-box question at training and inference time. List
# and text questions carry their own instruction in the query (the converter writes Qwen's cookbook prompt).
PROMPT_SUFFIX = (
    "Please enclose the corresponding positions using coordinate boxes. "
    "Examples of coordinate value formats: [x1,y1,x2,y2]."
)


def answer_kind(response: str) -> str:
    """BOX for a JSON object, BOXES for a JSON list, TEXT for anything else. Read from the first character,
    so a broken box answer is still a box answer and fails loudly where it is read, never trained as text."""
    start = response.lstrip()[:1]
    return {"{": BOX, "[": BOXES}.get(start, TEXT)


def build_messages(question: str, kind: str = BOX) -> list[dict]:
    """One user turn: the image placeholder, then the question (with the grounding instruction for one box)."""
    text = f"{question.strip()} {PROMPT_SUFFIX}" if kind == BOX else question.strip()
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


# Qwen3.5's template opens a think block after the generation prompt unless enable_thinking is false; then it
# writes the empty block "<think>\n\n</think>\n\n", as it renders a past answer given without reasoning. So the
# answer follows the same prompt in training, inference and GRPO. Other families' templates ignore the switch.
CHAT_TEMPLATE_KWARGS = {"enable_thinking": False}


def render_prompt(processor, question: str, kind: str = BOX) -> str:
    """The chat prompt the answer follows: one user turn, then the assistant's turn opened."""
    # Only to a template that reads the switches: others make transformers warn on every call.
    switches = CHAT_TEMPLATE_KWARGS if "enable_thinking" in str(processor.chat_template) else {}
    return processor.apply_chat_template(build_messages(question, kind), add_generation_prompt=True, **switches)


def format_answer(box) -> str:
    """The assistant's answer for a box, in Qwen2.5-VL's grounding format."""
    return json.dumps({"bbox_2d": [int(round(v)) for v in box]})


def format_boxes_answer(objects) -> str:
    """The assistant's answer for a list of {"bbox_2d", "label"} objects, in Qwen's list format ("[]" for none)."""
    return json.dumps([{"bbox_2d": [int(round(v)) for v in item["bbox_2d"]], "label": item["label"]} for item in objects])


def read_answer_box(answer: str) -> list[float]:
    """Strictly parse a dataset answer `{"bbox_2d": [x1, y1, x2, y2]}`; raise ValueError otherwise."""
    try:
        box = json.loads(answer)["bbox_2d"]
    except (json.JSONDecodeError, TypeError, KeyError) as error:
        raise ValueError(f'answer is not JSON with a "bbox_2d" key: {answer!r}') from error
    if not valid_box_values(box):
        raise ValueError(f"bbox_2d must be 4 finite numbers, got {box!r}")
    return [float(v) for v in box]


def read_answer_boxes(answer: str) -> list[dict]:
    """Strictly parse a dataset list answer into [{"bbox_2d": [4 floats], "label": str}]; raise ValueError otherwise."""
    try:
        objects = json.loads(answer)
    except json.JSONDecodeError as error:
        raise ValueError(f"answer is not a JSON list: {answer!r}") from error
    if not isinstance(objects, list):
        raise ValueError(f'answer is not a JSON list of {{"bbox_2d", "label"}} objects: {answer!r}')
    for number, item in enumerate(objects, start=1):
        if not isinstance(item, dict) or not valid_box_values(item.get("bbox_2d")):
            raise ValueError(f"object {number} of the answer needs a bbox_2d of 4 finite numbers, got {item!r}")
        if not isinstance(item.get("label", ""), str):
            raise ValueError(f"object {number} of the answer has a label that is not a string: {item!r}")
    return [{"bbox_2d": [float(v) for v in item["bbox_2d"]], "label": item.get("label", "")} for item in objects]


def valid_box_values(box) -> bool:
    return (
        isinstance(box, (list, tuple))
        and len(box) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
    )


_NUMBER = r"-?\d+(?:\.\d+)?"
_BOX_LIST = re.compile(rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]")
# Qwen2-VL's grounding form "<|box_start|>(x1,y1),(x2,y2)<|box_end|>" (the tags vanish when decoding skips special tokens).
_BOX_POINTS = re.compile(rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*,?\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)")


def parse_bbox(text: str) -> list[float] | None:
    """The first box in a model's output, or None if there is none.

    Accepts, in order: the trained format {"bbox_2d": [...]} (possibly inside a list or with text
    around it, e.g. a ```json fence), then the first bare [x1, y1, x2, y2] list in the text, then
    Qwen2-VL's (x1,y1),(x2,y2) point pair.
    """
    for candidate in _json_candidates(text):
        box = _find_bbox_2d(candidate)
        if box is not None:
            return box
    match = _BOX_LIST.search(text) or _BOX_POINTS.search(text)
    return [float(v) for v in match.groups()] if match else None


def _json_candidates(text: str):
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char in "{[":
            try:
                yield decoder.raw_decode(text, start)[0]
            except json.JSONDecodeError:
                continue


def _numbers_from_strings(values):
    """["1", "2", 3, "4"] -> [1.0, 2.0, 3.0, 4.0], as some models quote coordinates; anything else unchanged."""
    if not isinstance(values, list) or not any(isinstance(v, str) for v in values):
        return values
    if not all(isinstance(v, (int, float)) or (isinstance(v, str) and re.fullmatch(_NUMBER, v.strip())) for v in values):
        return values
    return [float(v) for v in values]


def _find_bbox_2d(value):
    if isinstance(value, dict):
        box = _numbers_from_strings(value.get("bbox_2d"))
        return [float(v) for v in box] if valid_box_values(box) else None
    if isinstance(value, list):
        for item in value:
            box = _find_bbox_2d(item)
            if box is not None:
                return box
    return None



# One flat {"bbox_2d": [...], "label": "..."} object as the model writes it (keys in any order): found one by
# one, so a list cut off by max_new_tokens keeps the boxes it finished.
_FLAT_OBJECT = re.compile(r"\{[^{}]*\}")


def parse_boxes(text: str) -> tuple[list[dict], bool]:
    """Every box of a model's list answer, in its order, as [{"bbox_2d": [4 floats], "label": str}], and
    whether the answer was well formed.

    Well formed: the first JSON value in the text (a ```json fence around it is fine) is a list of objects
    with a valid "bbox_2d", or one such object; "[]" is the answer "none". Anything else (a truncated
    list, prose) is malformed: its complete objects are still returned. Duplicates are kept, for scoring
    to count.
    """
    starts = [index for index in (text.find("["), text.find("{")) if index >= 0]
    if starts:
        try:
            value = json.JSONDecoder().raw_decode(text, min(starts))[0]
        except json.JSONDecodeError:
            value = None
        items = value if isinstance(value, list) else [value] if isinstance(value, dict) else None
        if items is not None:
            objects = [_box_object(item) for item in items]
            if all(objects):
                return objects, True
    found = []
    for span in _FLAT_OBJECT.findall(text):
        try:
            found.append(_box_object(json.loads(span)))
        except json.JSONDecodeError:
            continue
    return [item for item in found if item], False


def _box_object(item) -> dict | None:
    if not isinstance(item, dict):
        return None
    box = _numbers_from_strings(item.get("bbox_2d"))
    if not valid_box_values(box):
        return None
    return {"bbox_2d": [float(v) for v in box], "label": str(item.get("label", ""))}


_QUOTED_NUMBER = rf'"?({_NUMBER})"?'
_BBOX_2D_NUMBERS = re.compile(rf'"bbox_2d"\s*:\s*\[\s*{_QUOTED_NUMBER}\s*,\s*{_QUOTED_NUMBER}\s*,\s*{_QUOTED_NUMBER}\s*,\s*{_QUOTED_NUMBER}\s*\]')


def box_number_spans(text: str, kind: str = BOX) -> list[list[tuple[int, int]]]:
    """Where each box's four numbers are written in a model's answer, as character spans, in the order
    parse_boxes (kind BOXES) or parse_bbox (kind BOX: the first box only) return the boxes."""
    matches = list(_BBOX_2D_NUMBERS.finditer(text))
    if kind == BOX:
        matches = matches[:1] or [m for m in (_BOX_LIST.search(text) or _BOX_POINTS.search(text),) if m]
    return [[match.span(group) for group in range(1, 5)] for match in matches]
