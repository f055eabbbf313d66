"""What differs between the Qwen vision-language families, in one place.

A family is detected from the model's config.json `model_type`. It decides:
  coordinate system  how answers write a box: Qwen2.5-VL in pixels of the model frame (the image
                     the model receives), Qwen3-VL in integers 0-1000 of that frame
                     (`round(x / width * 1000)`);
  rope index         transformers' own `get_rope_index` of the family's model class;
  projector modules  the visual modules that map vision features into the language model;
  packing            whether packed batches keep samples apart here (Qwen3.5's Gated DeltaNet layers need kernels).
Patch and merge sizes are not stored here: they are read from the processor (ImageSettings).
"""

import importlib.util
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Model
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeModel

from utils import IMAGE_SETTINGS_FILE, box_to_model_frame, box_to_original_frame

MODEL_FRAME_PIXELS = "model_frame_pixels"
MODEL_FRAME_0_1000 = "model_frame_0_1000"
RELATIVE_SCALE = 1000


@dataclass(frozen=True)
class ModelFamily:
    model_type: str
    name: str
    coordinate_system: str
    base_model_class: type  # its get_rope_index defines the position ids
    projector_modules: tuple[str, ...]
    # Gated DeltaNet (linear attention) layers carry a recurrent state, and a short convolution, along the whole
    # row: in a packed row both run from one sample into the next unless kernels are told where samples start.
    linear_attention: bool = False

    def rope_index(self, spatial_merge_size: int) -> "RopeIndex":
        return RopeIndex(self.base_model_class, spatial_merge_size)

    def packing_refusal(self) -> str | None:
        """Why packed batches would train on mixed samples here, or None when they keep samples apart."""
        if not self.linear_attention or linear_attention_kernels_available():
            return None
        return (
            f"{self.name}'s Gated DeltaNet layers keep packed samples apart only with the flash-linear-attention "
            "and causal-conv1d kernels (CUDA), which are not installed or have no GPU here; transformers' torch "
            "fallback runs every packed row as one sequence, so each sample would read the one before it"
        )

    def packed_sequence_kwargs(self, lengths: list[int]) -> dict:
        """Batch keys that tell the linear-attention kernels where each packed sample starts: `cu_seq_lens_q`
        becomes chunk_gated_delta_rule's `cu_seqlens`, `seq_idx` causal_conv1d_fn's. transformers' torch
        fallback refuses both, so they are sent only to families that read them."""
        if not self.linear_attention:
            return {}
        lengths = torch.tensor(lengths)
        return {
            "cu_seq_lens_q": F.pad(lengths.cumsum(0), (1, 0)),
            "seq_idx": torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), lengths)[None],
        }


def linear_attention_kernels_available() -> bool:
    """transformers (5.24) uses flash-linear-attention's chunk_gated_delta_rule and causal-conv1d's
    causal_conv1d_fn whenever they import; both are Triton/CUDA kernels."""
    return torch.cuda.is_available() and all(importlib.util.find_spec(name) for name in ("fla", "causal_conv1d"))


FAMILIES = {
    family.model_type: family
    for family in (
        ModelFamily("qwen2_5_vl", "Qwen2.5-VL", MODEL_FRAME_PIXELS, Qwen2_5_VLModel, ("merger",)),
        # DeepStack: Qwen3-VL also projects features of some vision layers into the first LLM layers.
        ModelFamily("qwen3_vl", "Qwen3-VL", MODEL_FRAME_0_1000, Qwen3VLModel, ("merger", "deepstack_merger_list")),
        ModelFamily(
            "qwen3_vl_moe", "Qwen3-VL-MoE", MODEL_FRAME_0_1000, Qwen3VLMoeModel, ("merger", "deepstack_merger_list")
        ),
        # Qwen3.5: Qwen3-VL's vision path without DeepStack; boxes in 0-1000 as Qwen3-VL's (docs/families.md).
        ModelFamily("qwen3_5", "Qwen3.5", MODEL_FRAME_0_1000, Qwen3_5Model, ("merger",), linear_attention=True),
        ModelFamily(
            "qwen3_5_moe", "Qwen3.5-MoE", MODEL_FRAME_0_1000, Qwen3_5MoeModel, ("merger",), linear_attention=True
        ),
    )
}
# Known to transformers, close to a supported family, and still refused: why, so users know what is missing.
REFUSED = {
    "qwen2_vl": "Qwen2-VL answers in 0-1000 with <|box_start|>(x1,y1),(x2,y2)<|box_end|>, "
    "a format this repo does not train",
}


def supported() -> str:
    return ", ".join(f"{f.model_type} ({f.name})" for f in FAMILIES.values())


def family_by_type(model_type: str, where: str) -> ModelFamily:
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    reason = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
    raise ValueError(f"{where}: model_type {model_type!r} is not supported{reason}. Supported: {supported()}")


def detect_family(model_name_or_path: str) -> ModelFamily:
    """The family of a model dir or Hub id, from its config.json `model_type`."""
    config, _ = PretrainedConfig.get_config_dict(model_name_or_path)
    return family_by_type(config.get("model_type"), f"{model_name_or_path} (config.json)")


# For a processor built in memory (no config.json beside it). Qwen3VLProcessor also serves qwen3_vl_moe, whose
# answers and rope index are Qwen3-VL's.
FAMILY_OF_PROCESSOR_CLASS = {"Qwen2_5_VLProcessor": "qwen2_5_vl", "Qwen3VLProcessor": "qwen3_vl"}


def family_of_processor(processor) -> ModelFamily:
    """The family of the model a processor belongs to: the config.json in the folder it was loaded from, else
    its class (the tutorial's collator call passes only a processor)."""
    source_dir = processor.tokenizer.name_or_path
    if source_dir and os.path.isfile(os.path.join(source_dir, "config.json")):
        return detect_family(source_dir)
    processor_class = type(processor).__name__
    if processor_class in FAMILY_OF_PROCESSOR_CLASS:
        return FAMILIES[FAMILY_OF_PROCESSOR_CLASS[processor_class]]
    raise ValueError(
        f"cannot tell the model family of a {processor_class} without a config.json beside it: "
        "pass family=model_families.detect_family(MODEL_DIR)"
    )


def check_settings_family(settings, family: ModelFamily, settings_dir: str) -> None:
    """A model trained in one coordinate system must not be read in another: boxes would be silently wrong."""
    if settings.coordinate_system != family.coordinate_system:
        raise ValueError(
            f"{settings_dir}/{IMAGE_SETTINGS_FILE} was written for {settings.model_family} "
            f"({settings.coordinate_system}), but the model is {family.model_type} ({family.name}, "
            f"{family.coordinate_system}): use the model it was trained with"
        )


# ---------------------------------------------------------------- boxes in answers
def answer_frame_size(coordinate_system: str, model_size: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) an answer's numbers are measured in. 0-1000 of the model frame equals 0-1000
    of the original image: the model frame is the image scaled per axis, never cropped or padded."""
    if coordinate_system == MODEL_FRAME_PIXELS:
        return model_size
    if coordinate_system == MODEL_FRAME_0_1000:
        return RELATIVE_SCALE, RELATIVE_SCALE
    known = f"{MODEL_FRAME_PIXELS}, {MODEL_FRAME_0_1000}"
    raise ValueError(f"unknown coordinate system {coordinate_system!r}, known: {known}")


def box_to_answer(box, coordinate_system: str, original_size, model_size) -> list[int]:
    """Training target: an original-pixel box in the family's coordinates, whole numbers."""
    return box_to_model_frame(box, original_size, answer_frame_size(coordinate_system, model_size))


def box_from_answer(box, coordinate_system: str, model_size, original_size) -> list[float]:
    """A predicted box back in original pixels, clipped to the image."""
    return box_to_original_frame(box, answer_frame_size(coordinate_system, model_size), original_size)


# ---------------------------------------------------------------- position ids
class RopeIndex:
    """A family's `get_rope_index`, callable without loading the model: for images it reads only
    `spatial_merge_size` from the config (`tokens_per_second` is video-only)."""

    def __init__(self, base_model_class: type, spatial_merge_size: int):
        self.base_model_class = base_model_class
        self.config = SimpleNamespace(
            vision_config=SimpleNamespace(spatial_merge_size=spatial_merge_size, tokens_per_second=None)
        )

    def get_vision_position_ids(self, *args, **kwargs):
        return self.base_model_class.get_vision_position_ids(self, *args, **kwargs)

    def __call__(self, input_ids, mm_token_type_ids, image_grid_thw, attention_mask=None):
        position_ids, _ = self.base_model_class.get_rope_index(
            self, input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
        return position_ids
