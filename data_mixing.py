"""Training on several converter files at once (grounding mixed with general question answering, issue #31):
the mix, its log, and each source's own loss during training.

Sources are interleaved by datasets.interleave_datasets with train_dataset_weights as probabilities. Each
source is shuffled first (by the training seed), so an undersampled one contributes a random subset of its
rows, the same subset on every epoch and on resume. Each row carries its source's number; the collator turns it
into a `source_ids` tensor beside the labels (vision_datacollator.SOURCE_IDS), which the Trainer takes out
before the model's forward, to add the answer tokens' losses per source.
"""

import collections
import logging
import os

import datasets
import torch

from utils import IGNORE_INDEX
from vision_datacollator import SOURCE_IDS

logger = logging.getLogger("training")
# first_exhausted (datasets' default) ends the epoch when a source runs out: no row repeats within an epoch,
# and each source has its weight's share of the rows. all_exhausted repeats the others until the last has
# run out once (oversampling); all_exhausted_without_replacement takes every row once, then only the rest.
STOPPING_STRATEGIES = ("first_exhausted", "all_exhausted", "all_exhausted_without_replacement")
TRAINING_COLUMNS = ["image", "user", "assistant"]


def source_names(paths: list[str]) -> list[str]:
    """Each training file's name without folder and extension, numbered in front when two share a name."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{number}_{stem}" for number, stem in enumerate(stems)]


def mixing_problems(paths: list[str], weights: list[float] | None, stopping_strategy: str) -> list[str]:
    """Mistakes in the mixing keys, for training.check_config."""
    problems = []
    if weights is not None and len(weights) != len(paths):
        problems.append(f"train_dataset_weights: {len(weights)} weights for {len(paths)} train_dataset_name files")
    if weights is not None and not all(weight > 0 for weight in weights):
        problems.append(f"train_dataset_weights: every weight must be positive, got {weights}")
    if stopping_strategy not in STOPPING_STRATEGIES:
        problems.append(f"mixing_stopping_strategy: unknown {stopping_strategy!r}, use one of {STOPPING_STRATEGIES}")
    return problems


def mix_sources(sources, paths, weights, stopping_strategy, seed) -> datasets.Dataset:
    """One training set from several sources (a single one is returned as it is), with its mix logged: rows per
    source per epoch. Weights are relative (normalised here); none means equal."""
    if len(sources) == 1:
        return sources[0]
    weights = weights or [1.0] * len(sources)
    probabilities = [weight / sum(weights) for weight in weights]
    tagged = [
        source.select_columns(TRAINING_COLUMNS).shuffle(seed=seed).add_column("source", [number] * len(source))
        for number, source in enumerate(sources)
    ]
    mixed = datasets.interleave_datasets(
        tagged, probabilities=probabilities, seed=seed, stopping_strategy=stopping_strategy
    )
    counts = collections.Counter(mixed["source"])
    logger.info("training mix (%s): %d rows per epoch", stopping_strategy, len(mixed))
    for number, (path, source) in enumerate(zip(paths, sources)):
        logger.info(
            "  %s: %d rows per epoch (%.1f%%, weight %.1f%%) of its %d",
            path, counts[number], 100 * counts[number] / len(mixed), 100 * probabilities[number], len(source),
        )  # fmt: skip
    return mixed


class SourceLosses:
    """A Trainer mixin: with mixed sources, every training log also holds `loss_<source name>`, the mean loss of
    that source's answer tokens since the last log, summed over all processes (as the logged `loss` is)."""

    source_names: list[str] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        source_ids = inputs.pop(SOURCE_IDS, None)  # not a model input
        if source_ids is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if outputs.logits is not None:  # None when a fused loss (Liger) never builds the logits
            self.add_source_losses(outputs.logits.detach(), inputs["labels"], source_ids)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def add_source_losses(self, logits, labels, source_ids) -> None:
        # Token t predicts label t + 1; only the answer tokens count, as in the model's own loss.
        answer = labels[:, 1:] != IGNORE_INDEX
        token_losses = torch.nn.functional.cross_entropy(logits[:, :-1][answer].float(), labels[:, 1:][answer], reduction="none")
        sources = source_ids[:, 1:][answer]
        if not hasattr(self, "source_loss_sums"):
            self.source_loss_sums = torch.zeros(len(self.source_names), device=logits.device)
            self.source_token_counts = torch.zeros(len(self.source_names), device=logits.device)
        self.source_loss_sums.index_add_(0, sources, token_losses)
        self.source_token_counts.index_add_(0, sources, torch.ones_like(token_losses))

    def log(self, logs, *args, **kwargs):
        # Training logs ("loss") are written on every process (Trainer gathers the loss for them), so the sums
        # can be reduced here; an evaluation's or the final summary's logs pass unchanged.
        if "loss" in logs and hasattr(self, "source_loss_sums"):
            sums = self.accelerator.reduce(self.source_loss_sums, "sum")
            counts = self.accelerator.reduce(self.source_token_counts, "sum")
            for name, total, count in zip(self.source_names, sums.tolist(), counts.tolist()):
                if count:
                    logs[f"loss_{name}"] = round(total / count, 4)
            self.source_loss_sums.zero_()
            self.source_token_counts.zero_()
        super().log(logs, *args, **kwargs)
