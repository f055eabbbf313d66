"""Resuming and preemption, for every entry point that trains (sft.py, grpo.py): which checkpoint to resume
from (complete ones only), loading a full fine-tune's weights back, and save-and-stop on SIGTERM/SIGINT
(with a PREEMPTED file in output_dir until the run completes)."""

import glob
import json
import logging
import os
import re
import signal
import time
import zipfile

import torch
import torch.distributed as dist
from safetensors import safe_open
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from utils import write_text_atomic

logger = logging.getLogger("training")
# Exit status of a run stopped by SIGTERM/SIGINT after saving a checkpoint: sysexits.h's EX_TEMPFAIL
# ("temporary failure, the user is invited to retry"). Relaunching the same command resumes.
PREEMPTED_EXIT_CODE = 75
# `accelerate launch` exits 1 after its ranks exit 75, so a preempted run also leaves this file in output_dir
# (naming the step and checkpoint) for a requeue script to test; a run that completes removes it.
PREEMPTED_MARKER = "PREEMPTED"
# A launcher (torchrun, Slurm, a terminal's Ctrl-C) often delivers one preemption to a process twice: directly
# and forwarded. Only a signal this long after the first counts as the second one that stops at once.
FORWARDED_SIGNAL_WINDOW_S = 2.0


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
    """Mix into a Trainer class (before it) so resuming, and load_best_model_at_end, restore a full fine-tune's
    weights.

    transformers 5.24's save_pretrained reverts its weight conversion mapping, so checkpoints carry the Hub's
    original tensor names (Qwen2.5-VL: `visual.*`, `model.layers.*`), while Trainer._load_from_checkpoint and
    Trainer._load_best_model load model.safetensors with a non-strict load_state_dict and no conversion:
    nothing matches, a warning lists every key, and training goes on with the weights it had. When the names
    differ, load the checkpoint through from_pretrained (which applies the model family's conversion) and copy
    every weight in; otherwise (LoRA adapters, names that already match, DeepSpeed and FSDP which load their
    own) transformers does it."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if not load_converted_checkpoint(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        if not load_converted_checkpoint(self.state.best_model_checkpoint, self.model):
            super()._load_best_model()


def load_converted_checkpoint(checkpoint_dir: str, model) -> bool:
    """Copy a full-model checkpoint saved under the Hub's tensor names into `model`; False when its names
    already match the model's (or it holds no full model), for transformers' own loading."""
    names = saved_weight_names(checkpoint_dir)
    if names is None or names <= model.state_dict().keys():
        return False
    logger.info("loading %s through from_pretrained: its weight names are the Hub's", checkpoint_dir)
    loaded = type(model).from_pretrained(checkpoint_dir, dtype=model.dtype)
    model.load_state_dict(loaded.state_dict())  # strict: every weight must come from the checkpoint
    return True


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
            write_text_atomic(
                os.path.join(args.output_dir, PREEMPTED_MARKER),
                f"step {state.global_step} of {state.max_steps}: {checkpoint_dir}\n",
            )
            logger.warning(
                "preempted: saved %s at step %d of %d; run the same command again to resume (exit status %d)",
                checkpoint_dir, state.global_step, state.max_steps, PREEMPTED_EXIT_CODE,
            )  # fmt: skip
