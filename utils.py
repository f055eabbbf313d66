"""Helpers shared by conversion, training and inference, so the three can never drift apart.

Coordinate convention everywhere: boxes are [x1, y1, x2, y2] in pixel-edge coordinates of one
image frame (0 <= x1 < x2 <= width). Two frames exist:
  original  the image file on disk (what the converter writes and what metrics use);
  model     the exact size the model sees: the image scaled so its longer side is
            `max_image_side`, then snapped by Qwen's smart_resize to multiples of
            patch_size * merge_size within [min_pixels, max_pixels].
Training targets are boxes in the model frame, written in the model family's coordinates
(model_families.py); predictions are mapped back to the original frame. Prompts and answer texts
live in answers.py.
"""

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.ops import box_iou
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

IGNORE_INDEX = -100
IMAGE_SETTINGS_FILE = "grounding_image_settings.json"
# The longer image side before snapping, wherever none is given (sft.py, the collator, infer.py without
# saved settings, the benchmark): the tutorial's 256. A 640x480 TextVQA image becomes 252x196, 63 image tokens.
DEFAULT_MAX_IMAGE_SIDE = 256


# ---------------------------------------------------------------- images and frames
@dataclass
class ImageSettings:
    """How images are sized for the model, and the coordinate system its answers use (a
    model_families.ModelFamily's). Saved beside a trained model so inference reuses both."""

    max_image_side: int
    min_pixels: int
    max_pixels: int
    patch_size: int
    merge_size: int
    # Settings files written before families existed came from Qwen2.5-VL runs only.
    model_family: str = "qwen2_5_vl"
    coordinate_system: str = "model_frame_pixels"

    @classmethod
    def from_processor(cls, processor, max_image_side: int, family) -> "ImageSettings":
        image_processor = processor.image_processor
        return cls(
            max_image_side=int(max_image_side),
            min_pixels=int(image_processor.size["shortest_edge"]),
            max_pixels=int(image_processor.size["longest_edge"]),
            patch_size=int(image_processor.patch_size),
            merge_size=int(image_processor.merge_size),
            model_family=family.model_type,
            coordinate_system=family.coordinate_system,
        )

    def save(self, directory: str) -> None:
        write_json_atomic(os.path.join(directory, IMAGE_SETTINGS_FILE), asdict(self))

    @classmethod
    def load(cls, directory: str) -> "ImageSettings | None":
        path = os.path.join(directory, IMAGE_SETTINGS_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return cls(**json.load(f))


def model_frame_size(width: int, height: int, settings: ImageSettings) -> tuple[int, int]:
    """(width, height) of the image the model sees: longer side to max_image_side, then smart_resize."""
    scale = settings.max_image_side / max(width, height)
    target_height = max(1, round(height * scale))
    target_width = max(1, round(width * scale))
    frame_height, frame_width = smart_resize(
        target_height,
        target_width,
        factor=settings.patch_size * settings.merge_size,
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
    )
    return frame_width, frame_height


@contextmanager
def open_image(path: str):
    """Image.open with errors that name the file and say what to do."""
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError as error:
        raise FileNotFoundError(f"image not found: {path}") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: {error}. Re-export or remove this sample.") from error


def load_image(path: str) -> Image.Image:
    """Open an image as RGB (L, P, RGBA, CMYK... converted); a clear error names the file."""
    with open_image(path) as image:
        image.load()
        return image.convert("RGB")


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image file's header, without decoding it (load_image's size)."""
    with open_image(path) as image:
        return image.size


def to_model_frame(image: Image.Image, settings: ImageSettings) -> Image.Image:
    """Resize once, straight to the model frame, so the processor's own resize is a no-op."""
    size = model_frame_size(*image.size, settings)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def check_processor_kept_frame(image_path: str, image_size, image_grid_thw, patch_size: int) -> None:
    """Boxes are read in the model frame, so the processor must not have resized the image again
    (it does when its min/max pixels differ from the ImageSettings the image was sized with)."""
    _, grid_h, grid_w = (int(v) for v in image_grid_thw)
    seen_size = (grid_w * patch_size, grid_h * patch_size)
    if seen_size != tuple(image_size):
        raise ValueError(
            f"{image_path}: the processor resized {tuple(image_size)} again to {seen_size}; "
            f"its min/max pixels differ from the image settings ({IMAGE_SETTINGS_FILE})"
        )


def scale_box(box, from_size: tuple[int, int], to_size: tuple[int, int]) -> list[float]:
    """Scale an [x1, y1, x2, y2] box per axis from one (width, height) frame to another."""
    scale_x = to_size[0] / from_size[0]
    scale_y = to_size[1] / from_size[1]
    x1, y1, x2, y2 = box
    return [x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y]


def clip_box(box, size: tuple[int, int]) -> list[float]:
    width, height = size
    x1, y1, x2, y2 = box
    return [min(max(x1, 0), width), min(max(y1, 0), height), min(max(x2, 0), width), min(max(y2, 0), height)]


def box_to_model_frame(box, original_size, model_size) -> list[int]:
    """Training target: the original-pixel box in the model frame, rounded to whole units. A box that rounds to
    zero width or height (1 px of a 4000 px image) is kept one unit wide: an empty box is no target."""
    x1, y1, x2, y2 = (int(round(v)) for v in clip_box(scale_box(box, original_size, model_size), model_size))
    x1, x2 = _at_least_one_unit(x1, x2, model_size[0])
    y1, y2 = _at_least_one_unit(y1, y2, model_size[1])
    return [x1, y1, x2, y2]


def _at_least_one_unit(low: int, high: int, side: int) -> tuple[int, int]:
    if high != low:
        return low, high
    low = min(low, side - 1)
    return low, low + 1


def box_to_original_frame(box, model_size, original_size) -> list[float]:
    """Inverse of box_to_model_frame for a predicted box, clipped to the original image."""
    return [round(v, 2) for v in clip_box(scale_box(box, model_size, original_size), original_size)]


def box_ious(predicted_boxes, true_boxes) -> list[float]:
    """IoU of each predicted box with its own true box; a missing or inverted prediction
    (x2 <= x1 or y2 <= y1: not a box in our format) scores 0."""
    ious = []
    for predicted, true in zip(predicted_boxes, true_boxes):
        if predicted is None or predicted[2] <= predicted[0] or predicted[3] <= predicted[1]:
            ious.append(0.0)
            continue
        ious.append(float(box_iou(torch.tensor([predicted], dtype=torch.float64), torch.tensor([true], dtype=torch.float64))[0, 0]))
    return ious


# ---------------------------------------------------------------- files
def load_sft_jsonl(path: str) -> list[dict]:
    """Read the converter's JSONL into rows {"image": [abs path], "user": query, "assistant": response}, plus
    "answers" (every human answer, for VQA accuracy) on a line that has them (the converter's --task vqa).

    Image paths are resolved relative to the JSONL's folder, so a dataset dir can be moved.
    A malformed line raises ValueError naming the file and line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}. Run scripts/convert2sft_format.py first.")
    base_dir = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                images, query, response = record["image"], record["query"], record["response"]
                if isinstance(images, str):
                    images = [images]
                if len(images) != 1 or not isinstance(query, str) or not isinstance(response, str):
                    raise ValueError("expected one image path, a query string and a response string")
                answers = record.get("answers")
                if answers is not None and not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
                    raise ValueError(f'"answers" must be a list of strings, got {answers!r}')
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(
                    f"{path}:{line_number}: bad line ({error}); expected "
                    '{"image": [path], "query": str, "response": "{\\"bbox_2d\\": [...]}"}'
                ) from error
            row = {"image": [os.path.join(base_dir, images[0])], "user": query, "assistant": response}
            rows.append(row if answers is None else row | {"answers": answers})
    return rows


def processor_dir(adapter_dir: str | None, base_model: str) -> str:
    """Where to load the processor of a LoRA run: sft.py saves the one it trained with beside the
    adapter; without an adapter, or an adapter saved without it, the base model's."""
    saved_names = ("processor_config.json", "preprocessor_config.json")
    if adapter_dir and any(os.path.isfile(os.path.join(adapter_dir, name)) for name in saved_names):
        return adapter_dir
    return base_model


@contextmanager
def atomic_path(path: str):
    """A temporary path beside `path` to write, renamed to `path` once the block has finished without error: a
    reader never sees half a file."""
    tmp_path = f"{path}.tmp"
    yield tmp_path
    os.replace(tmp_path, path)


def write_text_atomic(path: str, text: str) -> None:
    with atomic_path(path) as tmp_path, open(tmp_path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2))


def write_jsonl_atomic(path, records) -> None:
    with atomic_path(path) as tmp_path, open(tmp_path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
