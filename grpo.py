"""GRPO after SFT: trl's GRPOTrainer samples boxes for each training question and reinforces those whose IoU
with the true box beats the group's mean, in the same prompt and image frame as sft.py.

    python grpo.py --config configs/demo_grpo_tiny_cpu.yaml
    accelerate launch --config_file configs/deepspeed_bf16_zero2.yaml --num_processes 8 \
        grpo.py --config configs/GRPO_Qwen2_5-VL-3B-Instruct_vqa.yaml

model_name_or_path is an SFT output dir (full fine-tune), a merged LoRA model (scripts/merge_model.py) or a
base model. Images are resized here, once, to the frame the starting model was trained in (its
grounding_image_settings.json; the config's max_image_side for a base model), and the true box (`solution`)
is scaled to that same frame, exactly as the SFT collator builds its target. The keys are the fields of
training.py's data, model and LoRA dataclasses, trl's GRPOConfig, and `reward_funcs` below. Run dir,
resume and SIGTERM handling are sft.py's (training.py, checkpoints.py).
"""

import json
import logging
import sys
from dataclasses import dataclass, field

import datasets
import transformers
from PIL import Image
from tqdm import tqdm
from transformers import AutoProcessor
from trl import GRPOConfig, GRPOTrainer, TrlParser

import checkpoints
import training
from answers import BOXES, CHAT_TEMPLATE_KWARGS, answer_kind, build_messages, read_answer_box, read_answer_boxes
from model_families import ModelFamily, box_to_answer, check_settings_family, detect_family
from rewards import REWARD_FUNCTIONS, check_rewards_cover, reward_functions
from utils import (
    ImageSettings,
    check_processor_kept_frame,
    load_image,
    load_sft_jsonl,
    model_frame_size,
    to_model_frame,
)

logger = logging.getLogger("grpo")


@dataclass
class RewardArguments:
    reward_funcs: list[str] = field(
        default_factory=lambda: ["iou", "format"],
        metadata={"help": f"Rewards by name, from {sorted(REWARD_FUNCTIONS)}; weigh them with reward_weights."},
    )


@dataclass
class GRPOTrainingArguments(training.SFTTrainingArguments, GRPOConfig):
    """trl's GRPOConfig plus sft.py's additions (overwrite_output_dir, the tutorial's warmup_ratio)."""

    # One --trust_remote_code, the model arguments': main() copies it here for trl's own loading.
    trust_remote_code: bool = field(default=False, init=False)


class GroundingGRPOTrainer(checkpoints.ConvertedCheckpointLoading, GRPOTrainer):
    """GRPOTrainer whose resume restores a full fine-tune's weights (see checkpoints.ConvertedCheckpointLoading)
    and whose forward passes mark the image tokens where they are."""

    def _get_per_token_logps_and_entropies(self, model, input_ids, *args, mm_token_type_ids=None, **kwargs):
        # trl 1.16 left-pads prompt_ids but takes mm_token_type_ids from the processor, which pads on its own
        # side: in every row shorter than the batch's longest the image marks miss the image tokens, so
        # get_rope_index gives the image wrong positions or fails with a shape mismatch (huggingface/trl#5785).
        # Rebuilt from the ids as the processor builds them; every forward pass (policy, old, reference) comes here.
        # tests/test_grpo.py says when a trl release aligns them itself and this override can go.
        if mm_token_type_ids is not None:
            mm_token_type_ids = image_token_marks(input_ids, self.model.config.image_token_id)
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, *args, mm_token_type_ids=mm_token_type_ids, **kwargs
        )


def image_token_marks(input_ids, image_token_id: int):
    """mm_token_type_ids for prompts that hold images only: 1 on each image token, 0 elsewhere."""
    return (input_ids == image_token_id).long()


def starting_image_settings(model_args, data_args, processor, family: ModelFamily) -> ImageSettings:
    """The frame the starting model was trained in; a base model has none saved, so the config's."""
    saved = ImageSettings.load(model_args.model_name_or_path)
    if saved is None:
        return ImageSettings.from_processor(processor, data_args.max_image_side, family)
    check_settings_family(saved, family, model_args.model_name_or_path)
    if saved.max_image_side != data_args.max_image_side:
        logger.warning(
            "max_image_side %d from %s/grounding_image_settings.json, not the config's %d: GRPO keeps the frame "
            "the model was trained in",
            saved.max_image_side,
            model_args.model_name_or_path,
            data_args.max_image_side,
        )
    return saved


def load_prompts(path: str, settings: ImageSettings, processor) -> datasets.Dataset:
    """Converter JSONL -> the rows GRPOTrainer samples: `prompt` (answers.build_messages for the row's kind),
    `image` (decoded when a row is read, already in the model frame), `kind` (answers.BOX or BOXES) and
    `solution`: the true box in that frame, in the family's coordinates, or for a list row the list of its
    true boxes so ([] for none).

    Every image is opened and every answer parsed now, so bad input stops before the model loads, with
    each unusable sample named. For each frame size the processor is asked once whether it would resize
    the image again (it must not: the boxes are in this frame)."""
    rows = load_sft_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no samples")
    samples, problems, frames = [], [], {}
    for number, row in enumerate(tqdm(rows, desc=f"reading {path}"), start=1):
        image_path = row["image"][0]
        kind = answer_kind(row["assistant"])
        try:
            original_size = load_image(image_path).size
            if kind == BOXES:
                true_boxes = [item["bbox_2d"] for item in read_answer_boxes(row["assistant"])]
            else:
                true_boxes = [read_answer_box(row["assistant"])]
        except (FileNotFoundError, ValueError) as error:
            problems.append(f"sample {number} (image {image_path}): {error}")
            continue
        frame = model_frame_size(*original_size, settings)
        frames.setdefault(frame, image_path)
        solution = [box_to_answer(box, settings.coordinate_system, original_size, frame) for box in true_boxes]
        # As JSON: a dataset column holds one type, and a box and a list of boxes are two.
        solution = json.dumps(solution if kind == BOXES else solution[0])
        samples.append({"image_path": image_path, "question": row["user"], "kind": kind, "solution": solution})
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise ValueError(f"{path}: {len(problems)} of {len(rows)} samples unusable, fix or remove them:\n  {shown}")
    for frame, image_path in frames.items():
        grid = processor.image_processor(images=[Image.new("RGB", frame)], return_tensors="pt")["image_grid_thw"][0]
        check_processor_kept_frame(image_path, frame, grid, settings.patch_size)

    def in_model_frame(batch):
        return {
            "prompt": [build_messages(question, kind) for question, kind in zip(batch["question"], batch["kind"])],
            "image": [to_model_frame(load_image(image_path), settings) for image_path in batch["image_path"]],
            "kind": batch["kind"],
            "solution": [json.loads(solution) for solution in batch["solution"]],
        }

    return datasets.Dataset.from_list(samples).with_transform(in_model_frame)


def main(reward_args, data_args, training_args, model_args, lora_args) -> int:
    """Train; return the exit status (0, or PREEMPTED_EXIT_CODE when a signal stopped the run)."""
    for name in ("grpo", "training"):
        logging.getLogger(name).setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    save_and_stop = checkpoints.SaveAndStopOnSignal()
    training_args.trust_remote_code = model_args.trust_remote_code
    training.name_run_dir(training_args)
    one_file = [] if len(data_args.train_dataset_name or []) < 2 else ["train_dataset_name: grpo.py trains on one file"]
    training.check_config(data_args, training_args, model_args, lora_args, one_file)
    rewards = reward_functions(reward_args.reward_funcs)
    # The same prompt as sft.py's and infer.py's (answers.render_prompt); the user's own keys win.
    training_args.chat_template_kwargs = {**CHAT_TEMPLATE_KWARGS, **(training_args.chat_template_kwargs or {})}
    family = detect_family(model_args.model_name_or_path)
    processor = AutoProcessor.from_pretrained(
        model_args.processor_name_or_path, trust_remote_code=model_args.trust_remote_code
    )
    image_settings = starting_image_settings(model_args, data_args, processor, family)
    train_dataset = load_prompts(data_args.train_dataset_name[0], image_settings, processor)
    # with_format(None): the kinds alone, without the transform decoding every image.
    check_rewards_cover(reward_args.reward_funcs, train_dataset.with_format(None)["kind"], data_args.train_dataset_name[0])
    evaluating = training_args.eval_strategy != "no"
    eval_dataset = load_prompts(data_args.test_dataset_name, image_settings, processor) if evaluating else None
    last_checkpoint = checkpoints.find_checkpoint(training_args)
    logger.info("train prompts: %d, eval prompts: %s", len(train_dataset), eval_dataset and len(eval_dataset))

    transformers.set_seed(training_args.seed)
    inference_files = training.SaveInferenceFiles(
        image_settings, model_args.model_name_or_path, data_args.train_dataset_name[0]
    )
    trainer = GroundingGRPOTrainer(
        model=training.load_model(model_args, lora_args, training_args, family),
        reward_funcs=rewards,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        callbacks=[inference_files, save_and_stop, *training.swanlab_callbacks(training_args)],
    )
    return training.train_and_save(trainer, last_checkpoint, inference_files, save_and_stop)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = TrlParser(
        (RewardArguments, training.DataTrainingArguments, GRPOTrainingArguments, training.ModelArguments,
         training.LoraArguments)
    )  # fmt: skip
    sys.exit(main(*parser.parse_args_and_config()))
