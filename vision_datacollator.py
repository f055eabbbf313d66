"""Turn converter rows into Qwen-VL training batches, for every family in model_families.py.

Each row {"image": [path], "user": question, "assistant": '{"bbox_2d": [x1, y1, x2, y2]}'} (box in
original pixels) becomes: the image resized once, straight to the frame the model sees; the box in
the family's coordinates of that frame; the chat prompt; labels on the answer only; and 3D mRoPE
position ids computed by the family's own transformers `get_rope_index`. A list answer (answers.py:
every object, or "[]") has each of its boxes mapped the same way; a text answer is trained as written.
Rows of a training mix carry their source's number ("source", data_mixing.py); the batch then holds it per token
as SOURCE_IDS, for the per-source losses, which is not a model input (the Trainer takes it out).
"""

import logging

import torch

from answers import (
    BOX,
    BOXES,
    answer_kind,
    format_answer,
    format_boxes_answer,
    read_answer_box,
    read_answer_boxes,
    render_prompt,
)
from model_families import box_to_answer, family_of_processor
from utils import (
    DEFAULT_MAX_IMAGE_SIDE,
    IGNORE_INDEX,
    ImageSettings,
    check_processor_kept_frame,
    image_size,
    load_image,
    model_frame_size,
    to_model_frame,
)

logger = logging.getLogger(__name__)
PADDING_MODES = ("max_length", "longest", "packed")
TOO_LONG_ACTIONS = ("drop", "raise")
SOURCE_IDS = "source_ids"


class GroundingCollator:
    """family: a model_families.ModelFamily (detect_family(model dir)); when not given, it is found from the
    processor (model_families.family_of_processor), so the tutorial's three-argument call still works.
    padding: "max_length" (every row padded to max_seq_length, the tutorial's), "longest" (pad to
    the longest row of the batch) or "packed" (one row, no padding; position ids in the (4, 1, L)
    form that transformers reads as packed, so attention never crosses samples).
    too_long: a sample longer than max_seq_length is never truncated (that would cut image
    tokens); it is dropped with a warning and counted in `num_dropped`, or raises.
    max_image_side: the longer image side before snapping (utils.DEFAULT_MAX_IMAGE_SIDE); the
    tutorial's name for it, max_img_side_length, is accepted too."""

    def __init__(
        self,
        processor,
        max_seq_length=1024,
        max_image_side=DEFAULT_MAX_IMAGE_SIDE,
        padding="longest",
        too_long="drop",
        max_img_side_length=None,
        *,
        family=None,
    ):
        if max_img_side_length is not None:
            if max_image_side not in (DEFAULT_MAX_IMAGE_SIDE, max_img_side_length):
                raise ValueError(f"max_image_side={max_image_side} and max_img_side_length={max_img_side_length}: give one")
            max_image_side = max_img_side_length
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
        if too_long not in TOO_LONG_ACTIONS:
            raise ValueError(f"too_long must be one of {TOO_LONG_ACTIONS}, got {too_long!r}")
        family = family or family_of_processor(processor)
        if padding == "packed" and (reason := family.packing_refusal()):
            raise ValueError(f"padding 'packed' is refused for {family.model_type}: {reason}. Use padding: longest")
        self.family = family
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_seq_length = max_seq_length
        self.padding = padding
        self.too_long = too_long
        self.image_settings = ImageSettings.from_processor(processor, max_image_side, family)
        self.rope_index = family.rope_index(self.image_settings.merge_size)
        self.num_dropped = 0

    def prompt_and_answer(self, example, original_size, frame_size) -> tuple[str, str]:
        """The chat prompt (one image placeholder) and the answer text it is trained to end with: a box or
        a list of boxes mapped into the family's coordinates of the frame, or a text answer as written."""
        kind = answer_kind(example["assistant"])
        coordinate_system = self.image_settings.coordinate_system
        try:
            if kind == BOX:
                box = read_answer_box(example["assistant"])
                answer = format_answer(box_to_answer(box, coordinate_system, original_size, frame_size))
            elif kind == BOXES:
                objects = read_answer_boxes(example["assistant"])
                for item in objects:
                    item["bbox_2d"] = box_to_answer(item["bbox_2d"], coordinate_system, original_size, frame_size)
                answer = format_boxes_answer(objects)
            else:
                answer = example["assistant"]
        except ValueError as error:
            raise ValueError(f"sample with image {example['image'][0]}: {error}") from error
        prompt = render_prompt(self.processor, example["user"], kind)
        return prompt, answer + "<|im_end|>"

    def token_count(self, example) -> int:
        """encode()'s length for a sample, from its image's header alone (no decoding): the prompt with its one
        image placeholder expanded to the frame's image tokens, plus the answer."""
        original_size = image_size(example["image"][0])
        frame_size = model_frame_size(*original_size, self.image_settings)
        prompt, answer = self.prompt_and_answer(example, original_size, frame_size)
        image_tokens = frame_size[0] * frame_size[1] // (self.image_settings.patch_size * self.image_settings.merge_size) ** 2
        text_tokens = len(self.tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
        return text_tokens - 1 + image_tokens

    def encode(self, example) -> dict | None:
        """One sample as unpadded tensors, or None if it is too long and dropped."""
        image_path = example["image"][0]
        image = load_image(image_path)
        original_size = image.size
        image = to_model_frame(image, self.image_settings)
        prompt, answer = self.prompt_and_answer(example, original_size, image.size)
        prompt_inputs = self.processor(text=[prompt], images=[image], return_tensors="pt")
        patch_size = self.image_settings.patch_size
        check_processor_kept_frame(image_path, image.size, prompt_inputs["image_grid_thw"][0], patch_size)
        # The answer is appended as token ids, exactly as generation will produce it after the prompt.
        answer_ids = self.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        prompt_ids = prompt_inputs["input_ids"][0]
        length = len(prompt_ids) + len(answer_ids)
        if length > self.max_seq_length:
            message = (
                f"sample with image {image_path} has {length} tokens > max_seq_length={self.max_seq_length}; "
                "raise max_seq_length or lower max_image_side"
            )
            if self.too_long == "raise":
                raise ValueError(message)
            self.num_dropped += 1
            logger.warning("%s: dropped (%d dropped so far)", message, self.num_dropped)
            return None
        input_ids = torch.cat([prompt_ids, answer_ids])
        source_ids = {SOURCE_IDS: torch.full_like(input_ids, example["source"])} if "source" in example else {}
        return source_ids | {
            "input_ids": input_ids,
            "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids]),
            "mm_token_type_ids": torch.cat(
                [prompt_inputs["mm_token_type_ids"][0], torch.zeros_like(answer_ids, dtype=torch.int)]
            ),
            "pixel_values": prompt_inputs["pixel_values"],
            "image_grid_thw": prompt_inputs["image_grid_thw"],
        }

    def __call__(self, examples):
        samples = [sample for sample in map(self.encode, examples) if sample is not None]
        if not samples:
            raise ValueError(
                f"every sample of this batch exceeds max_seq_length={self.max_seq_length}; "
                "raise max_seq_length or lower max_image_side"
            )
        batch = {
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "image_grid_thw": torch.cat([s["image_grid_thw"] for s in samples]),
        }
        if self.padding == "packed":
            return batch | self._pack(samples)
        return batch | self._pad(samples, batch["image_grid_thw"])

    def _pad(self, samples, image_grid_thw):
        length = self.max_seq_length if self.padding == "max_length" else max(len(s["input_ids"]) for s in samples)

        def pad(tensors, value):  # right padding, as training expects
            return torch.stack([torch.nn.functional.pad(t, (0, length - len(t)), value=value) for t in tensors])

        input_ids = pad([s["input_ids"] for s in samples], self.tokenizer.pad_token_id)
        attention_mask = pad([torch.ones_like(s["input_ids"]) for s in samples], 0)
        mm_token_type_ids = pad([s["mm_token_type_ids"] for s in samples], 0)
        source_ids = {SOURCE_IDS: pad([s[SOURCE_IDS] for s in samples], 0)} if SOURCE_IDS in samples[0] else {}
        return source_ids | {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": pad([s["labels"] for s in samples], IGNORE_INDEX),
            "mm_token_type_ids": mm_token_type_ids,
            "position_ids": self.rope_index(input_ids, mm_token_type_ids, image_grid_thw, attention_mask),
        }

    def _pack(self, samples):
        # mRoPE rows per sample (each restarts at 0), plus a plain text-position row on top: the
        # (4, 1, L) form makes transformers build a block-diagonal causal mask from restarts.
        position_ids = torch.cat(
            [
                torch.cat(
                    [
                        torch.arange(len(s["input_ids"])).view(1, 1, -1),
                        self.rope_index(s["input_ids"][None], s["mm_token_type_ids"][None], s["image_grid_thw"]),
                    ]
                )
                for s in samples
            ],
            dim=2,
        )
        source_ids = {SOURCE_IDS: torch.cat([s[SOURCE_IDS] for s in samples])[None]} if SOURCE_IDS in samples[0] else {}
        return source_ids | {
            "input_ids": torch.cat([s["input_ids"] for s in samples])[None],
            "labels": torch.cat([s["labels"] for s in samples])[None],
            "mm_token_type_ids": torch.cat([s["mm_token_type_ids"] for s in samples])[None],
            "position_ids": position_ids,
            **self.family.packed_sequence_kwargs([len(s["input_ids"]) for s in samples]),
            # transformers only builds the per-sample mask from position ids when no KV cache exists.
            "use_cache": False,
        }


# The tutorial's name for it: its sft.py imports it, and its YAML files select it by this name.
Qwen2_5VLCollator = GroundingCollator
vision_data_collator_map = {"GroundingCollator": GroundingCollator, "Qwen2_5VLCollator": Qwen2_5VLCollator}
