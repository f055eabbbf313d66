"""Merge a LoRA adapter into its base model and save one model that plain `from_pretrained` loads.

    python scripts/merge_model.py --base_model Qwen/Qwen2.5-VL-3B-Instruct \
        --adapter outputs/cpu_lora --output_dir outputs/merged

OUT receives the merged weights (in the base's dtype; the merge itself runs in float32), the
processor with its chat template, the generation config, the training's grounding_image_settings.json
(so infer.py and servers resize images as training did) and a model card README.md (model_card.py:
the frame, prompt, coordinates, how to serve, the adapter's last evaluation). It is written under a
temporary name and renamed at the end: never half-written.
"""

import argparse
import json
import os
import shutil
import sys

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model_card import card_metadata, last_eval_metrics, write_model_card  # noqa: E402
from model_families import check_settings_family, detect_family  # noqa: E402
from utils import IMAGE_SETTINGS_FILE, ImageSettings, processor_dir  # noqa: E402


def same_base(trained_on: str, given: str) -> bool:
    """One model when both name the same directory, or end in the same name (Qwen/X vs /weights/X)."""
    if os.path.realpath(trained_on) == os.path.realpath(given):
        return True
    return os.path.basename(os.path.normpath(trained_on)) == os.path.basename(os.path.normpath(given))


def untie_adapted_embeddings(model: PeftModel) -> bool:
    """When the adapter has LoRA on lm_head or embed_tokens and the base ties them (the real 3B and
    Qwen3-VL-4B do), give lm_head its own copy: merged into the one shared matrix, the LoRA would change
    both. True when it untied them."""
    embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
    if not model.config.tie_word_embeddings or not any(isinstance(layer, BaseTunerLayer) for layer in embeddings):
        return False
    lm_head = getattr(embeddings[1], "base_layer", embeddings[1])
    lm_head.weight = torch.nn.Parameter(lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return True


def adapter_eval_metrics(adapter_dir) -> dict:
    """The last evaluation of the adapter's training (its trainer_state.json), {} without one."""
    path = os.path.join(adapter_dir, "trainer_state.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return last_eval_metrics(json.load(f).get("log_history", []))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", required=True, help="the model the adapter was trained on (dir or hub id)")
    parser.add_argument("--adapter", required=True, help="the LoRA adapter dir (sft.py's output_dir)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--force", action="store_true", help="merge although the adapter names another base model")
    args = parser.parse_args()

    if os.path.exists(args.output_dir) and os.listdir(args.output_dir):
        sys.exit(f"--output_dir {args.output_dir} exists and is not empty: choose another or delete it")
    adapter_config = PeftConfig.from_pretrained(args.adapter)
    trained_on = adapter_config.base_model_name_or_path
    if trained_on and not same_base(trained_on, args.base_model) and not args.force:
        sys.exit(
            f"the adapter {args.adapter} was trained on {trained_on}, not on --base_model {args.base_model}. "
            "Pass the right base, or --force if it is the same model under another name."
        )

    # The settings travel with the merged model: they must be of the base model's family.
    candidates = (args.adapter, args.base_model)
    settings_dir = next((d for d in candidates if os.path.isfile(os.path.join(d, IMAGE_SETTINGS_FILE))), None)
    try:
        family = detect_family(args.base_model)
        if settings_dir is not None:
            check_settings_family(ImageSettings.load(settings_dir), family, settings_dir)
    except ValueError as error:
        sys.exit(f"error: {error}")

    # dtype="auto" finds the checkpoint's dtype as infer.py's loading does: the config's top-level dtype,
    # else the weights' (Qwen3-VL's config.json names it only in text_config, so config.dtype is None).
    model = AutoModelForImageTextToText.from_pretrained(args.base_model, dtype="auto")
    base_dtype = model.dtype
    model = model.float()
    try:
        model = PeftModel.from_pretrained(model, args.adapter)
    except (RuntimeError, ValueError) as error:  # size mismatch, or target modules missing from the base
        lines = str(error).strip().splitlines()
        more = f"\n... ({len(lines) - 4} more lines)" if len(lines) > 4 else ""
        details = "\n".join(lines[:4]) + more
        sys.exit(f"the adapter {args.adapter} does not fit --base_model {args.base_model}:\n{details}")
    if untie_adapted_embeddings(model):
        print("note: the adapter changes lm_head or embed_tokens: the merged model stores them untied", file=sys.stderr)
    model = model.merge_and_unload().to(base_dtype)

    # The processor and image settings travel with the adapter when training saved them there.
    processor = AutoProcessor.from_pretrained(processor_dir(args.adapter, args.base_model))
    if settings_dir is None:
        where = f"{args.adapter} or {args.base_model}"
        print(f"warning: no {IMAGE_SETTINGS_FILE} in {where}: infer.py will need --max_image_side", file=sys.stderr)

    output_dir = os.path.normpath(args.output_dir)
    tmp_dir = f"{output_dir}.tmp-{os.getpid()}"
    try:
        model.save_pretrained(tmp_dir)
        processor.save_pretrained(tmp_dir)
        if settings_dir is not None:
            shutil.copy2(os.path.join(settings_dir, IMAGE_SETTINGS_FILE), tmp_dir)
            dataset = card_metadata(args.adapter).get("datasets", [None])[0]
            settings = ImageSettings.load(settings_dir)
            metrics = adapter_eval_metrics(args.adapter)
            write_model_card(tmp_dir, settings, args.base_model, dataset, metrics, name=os.path.basename(output_dir))
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty, checked above
        os.replace(tmp_dir, output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"merged {args.adapter} into {args.base_model} ({base_dtype}): {output_dir}")


if __name__ == "__main__":
    main()
