"""Evaluation by generation during training (sft.py): at every evaluation the model answers the first
eval_generation_samples rows of the eval set the way infer.py does (scoring.predict, plain greedy decoding,
the collator's image frame), and the Trainer logs their acc@0.5 and mean IoU beside the eval loss, as
eval_acc@0.5 and eval_mean_iou; `metric_for_best_model: acc@0.5` then keeps the checkpoint that finds boxes
best. The same images with their boxes are drawn each time into output_dir/eval_boxes/step-N.jpg (and to
SwanLab), so the boxes can be watched converging."""

import math
import os
from dataclasses import dataclass, field

from accelerate.utils import gather_object
from peft import PeftModel

from pictures import draw_prediction, make_grid
from scoring import evaluate, plain_greedy, predict, read_true_boxes
from utils import atomic_path

EVAL_BOXES_DIR = "eval_boxes"
# The figures logged at each evaluation, under metric_key_prefix: eval_acc@0.5, eval_mean_iou of the single-box
# rows, and eval_f1@0.5, eval_recall@0.5 of the list rows (scoring.list_metrics) when the eval set has any.
GENERATION_METRICS = ("acc@0.5", "mean_iou", "f1@0.5", "recall@0.5")


@dataclass
class GenerationEvalArguments:
    eval_generation: bool = field(
        default=True,
        metadata={
            "help": "Whenever evaluation runs (eval_strategy), also generate answers for the first "
            "eval_generation_samples eval samples: log eval_acc@0.5 and eval_mean_iou (usable as "
            "metric_for_best_model: acc@0.5) and draw their boxes into output_dir/eval_boxes/step-N.jpg."
        },
    )
    eval_generation_samples: int = field(
        default=16, metadata={"help": "How many eval samples (the first ones) are answered and drawn each time."}
    )
    eval_generation_max_new_tokens: int = field(
        default=128, metadata={"help": "Longest answer generated, in tokens (infer.py's default)."}
    )


def generation_eval_problems(generation_args, training_args) -> list[str]:
    """Config mistakes, for training.check_config to report with the others before the model loads."""
    problems = []
    if generation_args.eval_generation:
        for key in ("eval_generation_samples", "eval_generation_max_new_tokens"):
            if getattr(generation_args, key) <= 0:
                problems.append(f"{key}: must be positive, got {getattr(generation_args, key)}")
    metric = training_args.metric_for_best_model or ""
    active = generation_args.eval_generation and training_args.eval_strategy != "no"
    if metric.removeprefix("eval_") in GENERATION_METRICS and not active:
        problems.append(
            f"metric_for_best_model: {metric} comes from eval_generation, which is off (or eval_strategy is no)"
        )
    return problems


class GenerationEvaluation:
    """Called by training.Trainer at every evaluation; returns {"acc@0.5": ..., "mean_iou": ...} (and the list
    rows' "f1@0.5", "recall@0.5").

    Whole batches of per_device_eval_batch_size go to each process, so the figures are the ones
    `infer.py --batch_size B --limit N` gives on a checkpoint of the same step, on any number of processes."""

    def __init__(self, eval_dataset, eval_path, settings, generation_args, batch_size, log_to_swanlab):
        count = min(generation_args.eval_generation_samples, len(eval_dataset))
        self.rows = eval_dataset.select(range(count)).to_list()
        self.true_boxes = read_true_boxes(eval_path, self.rows)  # a bad answer fails now, not at the first eval
        self.settings = settings
        self.batch_size = batch_size
        self.max_new_tokens = generation_args.eval_generation_max_new_tokens
        self.log_to_swanlab = log_to_swanlab

    def __call__(self, trainer) -> dict[str, float]:
        predictions = gather_object(self.predict_share(trainer.model, trainer.processing_class, trainer.accelerator))
        records, metrics = evaluate(self.rows, self.true_boxes, predictions)
        if trainer.is_world_process_zero():
            self.draw([record for record in records if record["error"] is None], trainer)
        # A figure with no rows behind it (no list rows, say) is None and not logged.
        return {name: metrics[name] for name in GENERATION_METRICS if metrics.get(name) is not None}

    def predict_share(self, model, processor, accelerator) -> list[dict]:
        """This process's share of whole batches, in eval mode and plain greedy; the model's mode, generation
        config and the tokenizer's padding side are put back for training (and for the processor it saves)."""
        num_batches = math.ceil(len(self.rows) / self.batch_size)
        batches_per_process = math.ceil(num_batches / accelerator.num_processes)
        share_size = batches_per_process * self.batch_size
        share = self.rows[accelerator.process_index * share_size :][:share_size]
        # Under ZeRO-3, generate is collective (every process gathers each layer's weights), so every process makes
        # as many generate calls: one with fewer batches (or none) answers the first row once per missing batch,
        # and those answers are dropped.
        missing_batches = batches_per_process - math.ceil(len(share) / self.batch_size)
        generator = model.get_base_model() if isinstance(model, PeftModel) else model  # whose generation_config counts
        was_training, generation_config = model.training, generator.generation_config
        padding_side = processor.tokenizer.padding_side
        model.eval()
        generator.generation_config = plain_greedy(generation_config)
        try:
            predictions = predict(
                model, processor, share, self.settings, self.batch_size, self.max_new_tokens, show_progress=False
            )
            spare_rows = self.rows[:1] * missing_batches
            predict(model, processor, spare_rows, self.settings, 1, self.max_new_tokens, show_progress=False)
        finally:
            model.train(was_training)
            generator.generation_config = generation_config
            processor.tokenizer.padding_side = padding_side
        return predictions

    def draw(self, records, trainer) -> None:
        """The grid of this evaluation's pictures, to output_dir/eval_boxes/step-N.jpg and SwanLab's eval/boxes."""
        step = trainer.state.global_step
        grid = make_grid([draw_prediction(record) for record in records])
        boxes_dir = os.path.join(trainer.args.output_dir, EVAL_BOXES_DIR)
        os.makedirs(boxes_dir, exist_ok=True)
        with atomic_path(os.path.join(boxes_dir, f"step-{step}.jpg")) as tmp_path:
            grid.save(tmp_path, format="JPEG", quality=90)
        if self.log_to_swanlab:
            import swanlab

            swanlab.log({"eval/boxes": swanlab.Image(grid, caption=f"step {step}")}, step=step)
