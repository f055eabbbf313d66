"""Supervised fine-tuning of Qwen2.5-VL or Qwen3-VL for grounding: a YAML config -> transformers' Trainer.

    python sft.py --config configs/tiny_cpu.yaml
    accelerate launch --config_file configs/deepspeed_bf16_zero2.yaml --num_processes 8 \
        sft.py --config configs/SFT_Qwen2_5-VL-3B-Instruct_vqa.yaml

Several train_dataset_name files are mixed by train_dataset_weights (data_mixing.py: the mix is logged at
start, each source's loss in every training log). Every YAML key can be overridden on the command line
(`--max_steps 100`). The keys are the fields of the dataclasses in training.py and generation_eval.py plus transformers' TrainingArguments. The run
is written to `<parent of output_dir>/<gpu|cpu>_<name of output_dir>` (the tutorial's naming); an existing run
there is resumed from its newest complete checkpoint. SIGTERM/SIGINT saves a checkpoint and exits
with checkpoints.PREEMPTED_EXIT_CODE (75); the same command then resumes.
"""

import logging
import sys

import transformers
from transformers import AutoProcessor
from trl import TrlParser

from checkpoints import SaveAndStopOnSignal, find_checkpoint
from data_mixing import mix_sources, source_names
from generation_eval import GenerationEvalArguments, GenerationEvaluation, generation_eval_problems
from model_families import detect_family
from training import (
    DataTrainingArguments,
    LoraArguments,
    ModelArguments,
    SaveInferenceFiles,
    SFTTrainingArguments,
    Trainer,
    check_config,
    drop_too_long,
    load_model,
    load_rows,
    name_run_dir,
    swanlab_callbacks,
    train_and_save,
)
from vision_datacollator import vision_data_collator_map

logger = logging.getLogger("sft")


def main(data_args, training_args, model_args, lora_args, generation_args) -> int:
    """Train; return the exit status (0, or PREEMPTED_EXIT_CODE when a signal stopped the run)."""
    for name in ("sft", "training"):
        logging.getLogger(name).setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    # Installed first: a signal during the minutes of loading still saves after the first step.
    save_and_stop = SaveAndStopOnSignal()
    name_run_dir(training_args)
    generation_problems = generation_eval_problems(generation_args, training_args)
    check_config(data_args, training_args, model_args, lora_args, generation_problems)
    train_paths = data_args.train_dataset_name
    train_sources = [load_rows(path) for path in train_paths]
    eval_dataset = load_rows(data_args.test_dataset_name) if training_args.eval_strategy != "no" else None
    last_checkpoint = find_checkpoint(training_args)
    train_counts = ", ".join(str(len(source)) for source in train_sources)
    logger.info("train samples: %s, eval samples: %s", train_counts, eval_dataset and len(eval_dataset))

    family = detect_family(model_args.model_name_or_path)
    logger.info("model family: %s (%s, answers in %s)", family.model_type, family.name, family.coordinate_system)
    transformers.set_seed(training_args.seed)
    processor = AutoProcessor.from_pretrained(
        model_args.processor_name_or_path, trust_remote_code=model_args.trust_remote_code
    )
    data_collator = vision_data_collator_map[data_args.data_collator](
        processor=processor,
        max_seq_length=data_args.max_seq_length,
        max_image_side=data_args.max_image_side,
        padding=data_args.padding,
        too_long=data_args.too_long,
        family=family,
    )
    show_progress = training_args.should_log
    train_sources = [drop_too_long(d, data_collator, path, show_progress) for d, path in zip(train_sources, train_paths)]
    train_dataset = mix_sources(
        train_sources, train_paths, data_args.train_dataset_weights, data_args.mixing_stopping_strategy,
        training_args.seed,
    )  # fmt: skip
    swanlab_loggers = swanlab_callbacks(training_args)
    generation_eval = None
    if eval_dataset is not None:
        eval_dataset = drop_too_long(eval_dataset, data_collator, data_args.test_dataset_name, show_progress)
        if generation_args.eval_generation:
            generation_eval = GenerationEvaluation(
                eval_dataset, data_args.test_dataset_name, data_collator.image_settings, generation_args,
                training_args.per_device_eval_batch_size, log_to_swanlab=bool(swanlab_loggers),
            )  # fmt: skip
    model = load_model(model_args, lora_args, training_args, family)
    inference_files = SaveInferenceFiles(
        data_collator.image_settings, model_args.model_name_or_path, ", ".join(data_args.train_dataset_name)
    )

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=processor,
        callbacks=[inference_files, save_and_stop, *swanlab_loggers],
        generation_eval=generation_eval,
        source_names=source_names(train_paths) if len(train_paths) > 1 else (),
    )
    return train_and_save(trainer, last_checkpoint, inference_files, save_and_stop)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = TrlParser(
        (DataTrainingArguments, SFTTrainingArguments, ModelArguments, LoraArguments, GenerationEvalArguments)
    )
    sys.exit(main(*parser.parse_args_and_config()))
