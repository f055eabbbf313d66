import pytest

from utils import parse_bbox

# What models really emit: the trained format, Qwen2.5-VL's zero-shot habits, Qwen2-VL's point
# pairs, truncated generations, and text with no box at all.
PARSER_TABLE = [
    ('{"bbox_2d": [12, 34, 56, 78]}', [12, 34, 56, 78]),
    ('{"bbox_2d": [12.5, 34, 56, 78.25]}', [12.5, 34, 56, 78.25]),
    ('{"bbox_2d": [-3, 5, 40, 60]}', [-3, 5, 40, 60]),  # out of the image: kept, clipped later
    ('```json\n[\n\t{"bbox_2d": [12, 34, 56, 78], "label": "the sign"}\n]\n```', [12, 34, 56, 78]),
    ('The sign is at {"bbox_2d": [1, 2, 3, 4]}.', [1, 2, 3, 4]),
    ('[{"label": "cup"}, {"bbox_2d": [5, 6, 7, 8], "label": "sign"}]', [5, 6, 7, 8]),
    ('[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]', [1, 2, 3, 4]),  # several: the first
    ('See [9, 9, 9, 9]? No: {"bbox_2d": [1, 2, 3, 4]}', [1, 2, 3, 4]),  # the trained key wins
    ('{"bbox_2d": [12, 34, 56, 78]}"}', [12, 34, 56, 78]),  # junk after the JSON
    ('[{"bbox_2d": [1, 2, 3, 4], "label": "the na', [1, 2, 3, 4]),  # cut off by max_new_tokens
    ("{'bbox_2d': [1, 2, 3, 4]}", [1, 2, 3, 4]),  # Python dict, not JSON
    ("[12, 34, 56, 78]", [12, 34, 56, 78]),
    ("[\n  12,\n  34,\n  56,\n  78\n]", [12, 34, 56, 78]),
    ("[[10, 20, 30, 40]]", [10, 20, 30, 40]),
    ("The box is [x1,y1,x2,y2] = [10, 20, 30, 40].", [10, 20, 30, 40]),
    ('{"bbox": [1, 2, 3, 4]}', [1, 2, 3, 4]),  # another key: the bare-list fallback
    ("<|box_start|>(10,20),(30,40)<|box_end|>", [10, 20, 30, 40]),  # Qwen2-VL
    ("(10, 20), (30.5, 40)", [10, 20, 30.5, 40]),  # the same with its tags skipped in decoding
    ("", None),
    ("I cannot find it in the image.", None),
    ('{"bbox_2d": [1, 2, 3]}', None),
    ("[1, 2, 3, 4, 5]", None),
    ('{"bbox_2d": ["1", "2", "3", "4"]}', None),
    ('{"bbox_2d": [true, 2, 3, 4]}', None),
    ("(10, 20)", None),
    ("x1=10, y1=20, x2=30, y2=40", None),
    ('{"bbox_2d": [', None),
    ("1 2 3 4", None),
]


@pytest.mark.parametrize("text, expected", PARSER_TABLE)
def test_parser_on_real_world_outputs(text, expected):
    assert parse_bbox(text) == expected
