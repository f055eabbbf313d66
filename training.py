"""Training shared by the entry points (sft.py, grpo.py): arguments, the run directory, choosing the checkpoint
to resume from, loading the model, and the callbacks (image settings, SwanLab, save-and-stop on SIGTERM)."""

import glob
import json
import logging
import os
import re
import signal
import time
import zipfile
from dataclasses import dataclass, field

import datasets
import torch
import torch.distributed as dist
import transformers
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import is_liger_kernel_available

from utils import DEFAULT_MAX_IMAGE_SIDE, load_sft_jsonl
from vision_datacollator import PADDING_MODES, TOO_LONG_ACTIONS, vision_data_collator_map

logger = logging.getLogger("training")
TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")
# Exit status of a run stopped by SIGTERM/SIGINT after saving a checkpoint: sysexits.h's EX_TEMPFAIL
# ("temporary failure, the user is invited to retry"). Relaunching the same command resumes.
PREEMPTED_EXIT_CODE = 75
# A launcher (torchrun, Slurm, a terminal's Ctrl-C) often delivers one preemption to a process twice: directly
# and forwarded. Only a signal this long after the first counts as the second one that stops at once.
FORWARDED_SIGNAL_WINDOW_S = 2.0


@dataclass
class DataTrainingArguments:
    train_dataset_name: str | None = field(
        default=None, metadata={"help": "Training JSONL written by scripts/convert2sft_format.py."}
    )
    test_dataset_name: str | None = field(
        default=None, metadata={"help": "Evaluation JSONL; required when eval_strategy is not 'no'."}
    )
    preprocessing_num_workers: int = field(
        default=1,
        metadata={
            "help": "Accepted so the tutorial's YAML loads; unused: rows come from JSONL and images are decoded "
            "by the collator (use dataloader_num_workers to decode them in parallel)."
        },
    )
    data_collator: str = field(
        default="GroundingCollator", metadata={"help": f"One of {sorted(vision_data_collator_map)}."}
    )
    max_seq_length: int = field(
        default=1024, metadata={"help": "Longest sample in tokens (image tokens included); see too_long."}
    )
    max_image_side: int = field(
        default=DEFAULT_MAX_IMAGE_SIDE,
        metadata={"help": "Images are scaled so their longer side is this, then snapped to 28 px."},
    )
    padding: str = field(default="longest", metadata={"help": f"Batch layout, one of {PADDING_MODES}."})
    too_long: str = field(
        default="drop", metadata={"help": f"What to do with a sample over max_seq_length: {TOO_LONG_ACTIONS}."}
    )


@dataclass
class ModelArguments:
    auto_model_class: str = field(
        default="AutoModelForImageTextToText",
        metadata={"help": "A transformers model class name; the default loads every supported family."},
    )
    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-VL-3B-Instruct", metadata={"help": "A local model folder or a Hugging Face Hub id."}
    )
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Where to load the processor from; defaults to model_name_or_path."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code shipped with the checkpoint (not needed for Qwen2.5-VL)."}
    )
    torch_dtype: str = field(default="bfloat16", metadata={"help": f"Weights dtype, one of {TORCH_DTYPES}."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2; default: transformers' choice."}
    )
    freeze_vision_tower: bool = field(
        default=False, metadata={"help": "Freeze the vision encoder (patch embedding and blocks, not the merger)."}
    )
    freeze_merger: bool = field(
        default=False, metadata={"help": "Freeze the merger, the projector from vision to language features."}
    )
    freeze_llm: bool = field(
        default=False, metadata={"help": "Freeze the language model, its embeddings and lm_head."}
    )

    def __post_init__(self):
        if self.processor_name_or_path is None:
            self.processor_name_or_path = self.model_name_or_path


@dataclass
class LoraArguments:
    use_lora: bool = field(
        default=False, metadata={"help": "Train LoRA adapters instead of the full model (freeze switches unused)."}
    )
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / r)."})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "Module names that get adapters; q/k/v/o_proj exist only in the language model."},
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    bias: str = field(default="none", metadata={"help": "peft's bias option: none, all or lora_only."})


@dataclass
class SFTTrainingArguments(TrainingArguments):
    """TrainingArguments plus the tutorial keys that transformers 5 removed, so its YAML still works."""

    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "Deprecated (removed in transformers 5): mapped to warmup_steps, which takes a ratio < 1."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train from scratch even if output_dir holds checkpoints."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay false: the collator reads the raw image/user/assistant columns."}
    )

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if self.warmup_steps:
                raise ValueError("set warmup_steps or warmup_ratio, not both (warmup_steps < 1 is a ratio)")
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            logger.warning(
                "warmup_ratio is deprecated in transformers 5: using warmup_steps: %s (a ratio of the total steps)",
                self.warmup_ratio,
            )
            self.warmup_steps, self.warmup_ratio = self.warmup_ratio, None
        super().__post_init__()


def name_run_dir(training_args) -> None:
    """The tutorial's naming: a device prefix on the run name, e.g. outputs/gpu_SFT_..._vqa (set in place)."""
    device_type = "gpu" if torch.cuda.is_available() and not training_args.use_cpu else "cpu"
    parent_dir, name = os.path.split(os.path.normpath(training_args.output_dir))
    training_args.output_dir = os.path.join(parent_dir, f"{device_type}_{name}")
    training_args.run_name = training_args.run_name or f"{device_type}_{name}"


def liger_kernel_problems(training_args) -> list[str]:
    """Trainer applies Liger kernels when training starts, after minutes of model loading, and only then
    raises if liger-kernel is missing; its Triton kernels also need a CUDA GPU."""
    if not training_args.use_liger_kernel:
        return []
    if not is_liger_kernel_available():
        return [
            "use_liger_kernel: true needs liger-kernel >= 0.3.0, which is not installed: "
            "pip install -r requirements-gpu.txt (NVIDIA GPU machines), or set use_liger_kernel: false"
        ]
    if training_args.use_cpu or not torch.cuda.is_available():
        return ["use_liger_kernel: Liger's Triton kernels need a CUDA GPU; set use_liger_kernel: false on CPU"]
    return []


def check_config(data_args, training_args, model_args, lora_args):
    """Every mistake visible without loading anything, reported together, before minutes of model loading."""
    problems = []
    if data_args.data_collator not in vision_data_collator_map:
        known = sorted(vision_data_collator_map)
        problems.append(f"data_collator: unknown {data_args.data_collator!r}, use one of {known}")
    if data_args.padding not in PADDING_MODES:
        problems.append(f"padding: unknown {data_args.padding!r}, use one of {PADDING_MODES}")
    if data_args.too_long not in TOO_LONG_ACTIONS:
        problems.append(f"too_long: unknown {data_args.too_long!r}, use one of {TOO_LONG_ACTIONS}")
    for key in ("max_seq_length", "max_image_side"):
        if getattr(data_args, key) <= 0:
            problems.append(f"{key}: must be positive, got {getattr(data_args, key)}")
    if not hasattr(transformers, model_args.auto_model_class):
        problems.append(f"auto_model_class: transformers has no class {model_args.auto_model_class!r}")
    if model_args.torch_dtype not in TORCH_DTYPES:
        problems.append(f"torch_dtype: unknown {model_args.torch_dtype!r}, use one of {TORCH_DTYPES}")
    if model_args.freeze_vision_tower and model_args.freeze_merger and model_args.freeze_llm and not lora_args.use_lora:
        problems.append("freeze_vision_tower, freeze_merger and freeze_llm are all true: nothing is left to train")
    problems += liger_kernel_problems(training_args)
    if training_args.remove_unused_columns:
        problems.append("remove_unused_columns: must be false, the collator reads the raw image/user/assistant columns")
    evaluating = training_args.eval_strategy != "no"
    for key, needed in (("train_dataset_name", True), ("test_dataset_name", evaluating)):
        path = getattr(data_args, key)
        if path is None and needed:
            problems.append(f"{key}: not set" + (" (needed by eval_strategy)" if evaluating else ""))
        elif needed and not os.path.isfile(path):
            problems.append(f"{key}: file not found: {path} (write it with scripts/convert2sft_format.py)")
    if problems:
        raise ValueError("bad config:\n  - " + "\n  - ".join(problems))


def load_rows(path: str) -> datasets.Dataset:
    """Converter JSONL -> Dataset (image, user, assistant); missing images fail now, not mid-training."""
    rows = load_sft_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no samples")
    missing = [row["image"][0] for row in rows if not os.path.isfile(row["image"][0])]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} of {len(rows)} images not found, e.g. {missing[0]}")
    return datasets.Dataset.from_list(rows)


def checkpoint_problem(checkpoint_dir: str) -> str | None:
    """Why a checkpoint cannot be resumed from, or None. transformers writes trainer_state.json last, so a save
    cut short lacks it; a weight file cut short has a bad safetensors header or no zip directory (torch.save)."""
    if not os.path.isfile(os.path.join(checkpoint_dir, "trainer_state.json")):
        return "no trainer_state.json"
    files = glob.glob(os.path.join(checkpoint_dir, "**", "*"), recursive=True)
    weights = [path for path in files if path.endswith(".safetensors")]
    pickles = [path for path in files if path.endswith((".pt", ".pth", ".bin"))]
    if not weights and not pickles:
        return "no weight files"
    for path in weights:
        try:
            with safe_open(path, "pt"):
                pass
        except Exception as error:
            return f"{os.path.relpath(path, checkpoint_dir)}: {error}"
    for path in pickles:
        if not zipfile.is_zipfile(path):
            return f"{os.path.relpath(path, checkpoint_dir)}: cut short"
    return None


def find_checkpoint(training_args) -> str | None:
    """The newest complete checkpoint-N in output_dir to resume from, None for a fresh run. Newer incomplete
    ones (a save cut short by a kill) are renamed incomplete-checkpoint-N so they are never picked again:
    rank 0 renames first, then the other ranks look at what is left, so every rank picks the same one."""
    output_dir = training_args.output_dir
    if training_args.overwrite_output_dir or not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return None
    with training_args.main_process_first(local=False, desc="choosing the checkpoint to resume from"):
        numbered = [name for name in os.listdir(output_dir) if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", name)]
        for name in sorted(numbered, key=lambda name: int(name.split("-")[1]), reverse=True):
            checkpoint_dir = os.path.join(output_dir, name)
            problem = checkpoint_problem(checkpoint_dir)
            if problem is None:
                logger.info(
                    "Checkpoint detected, resuming training at %s. To train from scratch, change --output_dir "
                    "or pass --overwrite_output_dir true.",
                    checkpoint_dir,
                )
                return checkpoint_dir
            if training_args.process_index == 0:
                # Not checkpoint-N.incomplete: Trainer's save_total_limit rotation globs checkpoint-* and deletes it.
                moved_to, copies = os.path.join(output_dir, f"incomplete-{name}"), 1
                while os.path.exists(moved_to):  # torn at the same step before: keep that one too
                    copies += 1
                    moved_to = os.path.join(output_dir, f"incomplete{copies}-{name}")
                os.rename(checkpoint_dir, moved_to)
                logger.warning("incomplete checkpoint %s (%s): moved aside to %s", checkpoint_dir, problem, moved_to)
    raise ValueError(
        f"output_dir {output_dir} is not empty and holds no complete {PREFIX_CHECKPOINT_DIR}-* folder to resume "
        "from: choose another output_dir, or pass --overwrite_output_dir true to train from scratch into it"
    )


def freeze_parts(model, model_args, family) -> None:
    """The tutorial's switches. Merger = the family's projectors into the language model; vision tower =
    every other visual module."""
    visual = model.model.visual
    projectors = family.projector_modules
    parts = (
        (model_args.freeze_vision_tower, [m for name, m in visual.named_children() if name not in projectors]),
        (model_args.freeze_merger, [getattr(visual, name) for name in projectors]),
        (model_args.freeze_llm, [model.model.language_model, model.lm_head]),
    )
    for frozen, modules in parts:
        for module in modules if frozen else []:
            module.requires_grad_(False)


def count_parameters(model) -> tuple[int, int]:
    # Under ZeRO-3 init a parameter is a partition; ds_numel is its full size.
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(size for size, trainable in sizes if trainable), sum(size for size, _ in sizes)


def load_model(model_args, lora_args, family):
    """The model to train: from_pretrained, the freeze switches, then LoRA adapters if asked for."""
    model = getattr(transformers, model_args.auto_model_class).from_pretrained(
        model_args.model_name_or_path,
        dtype=model_args.torch_dtype,
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
    )
    freeze_parts(model, model_args, family)
    if lora_args.use_lora:
        lora_config = LoraConfig(
            r=lora_args.r,
            lora_alpha=lora_args.lora_alpha,
            target_modules=lora_args.target_modules,
            lora_dropout=lora_args.lora_dropout,
            bias=lora_args.bias,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def saved_weight_names(checkpoint_dir: str) -> set[str] | None:
    """The tensor names in a checkpoint's full-model safetensors (one file or an index), None if it has none."""
    index_file = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        with open(index_file) as f:
            return set(json.load(f)["weight_map"])
    weights_file = os.path.join(checkpoint_dir, "model.safetensors")
    if os.path.isfile(weights_file):
        with safe_open(weights_file, "pt") as f:
            return set(f.keys())
    return None


class ConvertedCheckpointLoading:
    """Mix into a Trainer class (before it) so resuming restores a full fine-tune's weights.

    transformers 5.24's save_pretrained reverts its weight conversion mapping, so checkpoints carry the Hub's
    original tensor names (Qwen2.5-VL: `visual.*`, `model.layers.*`), while Trainer._load_from_checkpoint
    loads model.safetensors with a non-strict load_state_dict and no conversion: nothing matches, a warning
    lists every key, and training goes on from the base model's weights. When the names differ, load the
    checkpoint through from_pretrained (which applies the model family's conversion) and copy every weight
    in; otherwise (LoRA adapters, names that already match, DeepSpeed which loads its own) transformers does it."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        names = saved_weight_names(resume_from_checkpoint)
        if names is None or names <= model.state_dict().keys():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("loading %s through from_pretrained: its weight names are the Hub's", resume_from_checkpoint)
        loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(loaded.state_dict())  # strict: every weight must come from the checkpoint


class Trainer(ConvertedCheckpointLoading, transformers.Trainer):
    pass


class SaveImageSettings(TrainerCallback):
    """Every checkpoint gets the image settings too, so any checkpoint can be used for inference."""

    def __init__(self, image_settings):
        self.image_settings = image_settings

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.image_settings.save(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


def swanlab_callbacks(training_args) -> list:
    """report_to swanlab through SwanLab's own Trainer callback: transformers 5's built-in one expects
    swanlab.get_run() to return None before a run exists, and swanlab 0.10 raises instead."""
    if "swanlab" not in training_args.report_to:
        return []
    from swanlab.integration.transformers import SwanLabCallback

    training_args.report_to = [name for name in training_args.report_to if name != "swanlab"]
    return [SwanLabCallback(project=os.getenv("SWANLAB_PROJECT"), experiment_name=training_args.run_name)]


class SaveAndStopOnSignal(TrainerCallback):
    """SIGTERM/SIGINT: finish the current step, save a checkpoint, stop; `preempted` then tells the entry point
    to exit with PREEMPTED_EXIT_CODE. A second signal (FORWARDED_SIGNAL_WINDOW_S after the first) kills at once.
    Ranks can get the signal at different steps: at every step end they agree on "any rank was signalled" with
    an all-reduce, so all of them save (ZeRO saves need every rank) and stop at the same step."""

    def __init__(self):
        self.signalled_at = None
        self.preempted = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum, frame):
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
            logger.warning("%s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)
        elif time.monotonic() - self.signalled_at > FORWARDED_SIGNAL_WINDOW_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def on_step_end(self, args, state, control, **kwargs):
        signalled = torch.tensor(float(self.signalled_at is not None), device=args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(signalled, op=dist.ReduceOp.MAX)
        if signalled.item() and state.global_step < state.max_steps:
            self.preempted = control.should_save = control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.preempted and state.is_world_process_zero:
            checkpoint_dir = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            logger.warning(
                "preempted: saved %s at step %d of %d; run the same command again to resume (exit status %d)",
                checkpoint_dir, state.global_step, state.max_steps, PREEMPTED_EXIT_CODE,
            )  # fmt: skip


def train_and_save(trainer, last_checkpoint, image_settings, save_and_stop) -> int:
    """The end every entry point shares: train (resuming from last_checkpoint), then save the model (or LoRA
    adapter), processor, trainer state and image settings. Returns the exit status: 0, or
    PREEMPTED_EXIT_CODE when a signal stopped the run after saving a checkpoint."""
    state = trainer.accelerator.state
    logger.info(
        "distributed: %s, %d process(es)%s",
        state.distributed_type.value,
        state.num_processes,
        f", ZeRO stage {state.deepspeed_plugin.zero_stage}" if trainer.is_deepspeed_enabled else "",
    )
    trainer.train(resume_from_checkpoint=last_checkpoint)
    if save_and_stop.preempted:
        return PREEMPTED_EXIT_CODE
    # save_model writes the model (or, with LoRA, the adapter) and the processor; every rank takes part.
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        image_settings.save(output_dir)
        logger.info("model, processor and image settings saved to %s", output_dir)
    return 0
