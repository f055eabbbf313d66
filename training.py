"""Training shared by the entry points (sft.py, grpo.py): arguments, the run directory, config checks, loading
the model, the callbacks (image settings, SwanLab) and the shared ending (train, save). Resuming and
preemption live in checkpoints.py."""

import logging
import os
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import is_liger_kernel_available

from checkpoints import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, ConvertedCheckpointLoading
from data_mixing import SourceLosses, mixing_problems
from model_card import last_eval_metrics, write_model_card
from utils import DEFAULT_MAX_IMAGE_SIDE, load_sft_jsonl
from vision_datacollator import PADDING_MODES, TOO_LONG_ACTIONS, vision_data_collator_map

logger = logging.getLogger("training")
TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class DataTrainingArguments:
    train_dataset_name: list[str] | None = field(
        default=None,
        metadata={
            "help": "Training JSONL written by scripts/convert2sft_format.py, or a list of them to mix "
            "(train_dataset_weights; data_mixing.py)."
        },
    )
    train_dataset_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Relative weight of each train_dataset_name file in the mix, e.g. [0.8, 0.2]; default equal."},
    )
    mixing_stopping_strategy: str = field(
        default="first_exhausted",
        metadata={
            "help": "datasets.interleave_datasets' stopping_strategy: first_exhausted ends the epoch when a source "
            "runs out (no row repeats), all_exhausted oversamples until every source has run out once."
        },
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

    def __post_init__(self):
        if isinstance(self.train_dataset_name, str):  # a single file, as the tutorial's YAML gives it
            self.train_dataset_name = [self.train_dataset_name]


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


def check_config(data_args, training_args, model_args, lora_args, more_problems=()):
    """Every mistake visible without loading anything (more_problems: an entry point's own), reported together,
    before minutes of model loading."""
    problems = list(more_problems)
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
    files = [("train_dataset_name", path, True) for path in data_args.train_dataset_name or [None]]
    for key, path, needed in files + [("test_dataset_name", data_args.test_dataset_name, evaluating)]:
        if path is None and needed:
            problems.append(f"{key}: not set" + (" (needed by eval_strategy)" if evaluating else ""))
        elif needed and not os.path.isfile(path):
            problems.append(f"{key}: file not found: {path} (write it with scripts/convert2sft_format.py)")
    if data_args.train_dataset_name:
        problems += mixing_problems(
            data_args.train_dataset_name, data_args.train_dataset_weights, data_args.mixing_stopping_strategy
        )
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


def drop_too_long(dataset: datasets.Dataset, data_collator, path: str, show_progress: bool) -> datasets.Dataset:
    """The samples of `path` that fit max_seq_length, found before training from image headers (no decoding).
    Over-long ones are dropped and counted (too_long: drop) or all named at once (raise). Every rank drops the
    same rows, so all see the same number of batches: dropped inside the collator, a batch left empty would stop
    one rank while the others wait for it in a collective until the timeout."""
    limit = data_collator.max_seq_length
    counting = tqdm(dataset, desc=f"counting tokens of {path}", disable=not show_progress)
    lengths = [data_collator.token_count(row) for row in counting]
    too_long = [number for number, length in enumerate(lengths, start=1) if length > limit]
    if not too_long:
        return dataset
    named = ", ".join(f"sample {number} ({lengths[number - 1]} tokens)" for number in too_long[:10])
    summary = (
        f"{path}: {len(too_long)} of {len(dataset)} samples exceed max_seq_length={limit}: {named}"
        f"{', ...' if len(too_long) > 10 else ''}; raise max_seq_length or lower max_image_side"
    )
    if data_collator.too_long == "raise" or len(too_long) == len(dataset):
        raise ValueError(summary)
    logger.warning("dropped (too_long: drop): %s", summary)
    return dataset.select([index for index, length in enumerate(lengths) if length <= limit])


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


def weights_dtype(model_args, lora_args, training_args) -> str:
    """torch_dtype, except for a full fine-tune outside DeepSpeed, whose optimizer updates the loaded weights
    themselves: in bf16, an Adam step of lr 1e-5 on a weight of 0.02 is under half of bf16's spacing there
    (1.2e-4) and rounds away. Those weights are loaded in float32, and bf16/fp16 run as autocast. DeepSpeed keeps
    float32 master weights of its own; LoRA trains float32 adapters (peft) beside frozen base weights."""
    if lora_args.use_lora or training_args.deepspeed_plugin is not None or model_args.torch_dtype == "float32":
        return model_args.torch_dtype
    logger.warning(
        "full fine-tuning without DeepSpeed: weights loaded in float32, not torch_dtype %s, so small updates are "
        "not rounded away (bf16/fp16 run as autocast). This needs 16 bytes per parameter with AdamW; DeepSpeed "
        "ZeRO or LoRA need less",
        model_args.torch_dtype,
    )
    return "float32"


def load_model(model_args, lora_args, training_args, family):
    """The model to train: from_pretrained (in weights_dtype), the freeze switches, then LoRA adapters if asked for."""
    model = getattr(transformers, model_args.auto_model_class).from_pretrained(
        model_args.model_name_or_path,
        dtype=weights_dtype(model_args, lora_args, training_args),
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


class Trainer(SourceLosses, ConvertedCheckpointLoading, transformers.Trainer):
    """transformers' Trainer that restores converted checkpoints, logs each source's loss of a training mix
    (source_names: data_mixing.source_names of the files) and, given generation_eval (a
    generation_eval.GenerationEvaluation), adds its box figures to every evaluation's metrics."""

    def __init__(self, *args, generation_eval=None, source_names=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_eval = generation_eval
        self.source_names = list(source_names)

    def evaluation_loop(self, *args, metric_key_prefix="eval", **kwargs):
        # Here rather than in a callback's on_evaluate: Trainer.evaluate logs the loop's metrics (to report_to and
        # trainer_state.json) before it calls the callbacks, and then picks the best checkpoint from them.
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        if self.generation_eval is not None:
            figures = self.generation_eval(self)
            output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in figures.items()})
        return output


class SaveInferenceFiles(TrainerCallback):
    """Every checkpoint, and the final save, gets what inference needs beside the weights and processor (which
    Trainer saves): the image settings, a generation config (a LoRA adapter has none of its own) and the model
    card, so any of them can be used, served or handed over (model_card.py)."""

    def __init__(self, image_settings, base_model, dataset):
        self.image_settings, self.base_model, self.dataset = image_settings, base_model, dataset

    def save(self, directory, model, log_history) -> None:
        self.image_settings.save(directory)
        if not os.path.isfile(os.path.join(directory, "generation_config.json")):
            model.generation_config.save_pretrained(directory)
        adapter = os.path.isfile(os.path.join(directory, "adapter_config.json"))
        metrics = last_eval_metrics(log_history)
        write_model_card(directory, self.image_settings, self.base_model, self.dataset, metrics, adapter)

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            checkpoint_dir = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self.save(checkpoint_dir, model, state.log_history)


def swanlab_callbacks(training_args) -> list:
    """report_to swanlab through SwanLab's own Trainer callback: transformers 5's built-in one expects
    swanlab.get_run() to return None before a run exists, and swanlab 0.10 raises instead."""
    if "swanlab" not in training_args.report_to:
        return []
    from swanlab.integration.transformers import SwanLabCallback

    training_args.report_to = [name for name in training_args.report_to if name != "swanlab"]
    return [SwanLabCallback(project=os.getenv("SWANLAB_PROJECT"), experiment_name=training_args.run_name)]


def train_and_save(trainer, last_checkpoint, inference_files, save_and_stop) -> int:
    """The end every entry point shares: train (resuming from last_checkpoint), then save the model (or LoRA
    adapter), processor, trainer state and inference_files (a SaveInferenceFiles). Returns the exit status: 0, or
    PREEMPTED_EXIT_CODE when a signal stopped the run after saving a checkpoint."""
    state = trainer.accelerator.state
    logger.info(
        "distributed: %s, %d process(es)%s",
        state.distributed_type.value,
        state.num_processes,
        f", ZeRO stage {state.deepspeed_plugin.zero_stage}" if trainer.is_deepspeed_enabled else "",
    )
    trainer.train(resume_from_checkpoint=last_checkpoint)
    if not save_and_stop.preempted:
        save_final(trainer, inference_files)
    # Every rank leaves the process group before it exits, and all of them together: one that exited with it
    # alive, or left it while rank 0 was still writing the final save, was aborted ("terminate called without an
    # active exception", SIGABRT) after a complete ZeRO-3 save, failing the run.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return PREEMPTED_EXIT_CODE if save_and_stop.preempted else 0


def save_final(trainer, inference_files) -> None:
    """The model (or, with LoRA, the adapter) and processor, with every rank taking part; then, on rank 0, the
    trainer state, image settings, generation config and model card, and the end of any PREEMPTED marker."""
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        inference_files.save(output_dir, trainer.model, trainer.state.log_history)
        logger.info("model, processor, image settings and model card saved to %s", output_dir)
        if os.path.exists(os.path.join(output_dir, PREEMPTED_MARKER)):
            os.remove(os.path.join(output_dir, PREEMPTED_MARKER))
