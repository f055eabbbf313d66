"""The model card (README.md) that every saved model carries (sft.py's and grpo.py's final save and
checkpoints, scripts/merge_model.py's merged model): HF metadata, then what a user of plain transformers or
of a server must do to get this model's boxes right: the frame rule, the prompt, the coordinate system,
and how to serve it."""

import os

import yaml

from model_families import FAMILIES, MODEL_FRAME_0_1000
from answers import PROMPT_SUFFIX
from utils import IMAGE_SETTINGS_FILE, write_text_atomic

CARD_FILE = "README.md"
# Where the plain-transformers example and the server command lines are kept.
REPO_GUIDE = "the training repo's README.md (serving section) and docs/serving.md"


def last_eval_metrics(log_history) -> dict:
    """The numbers of the last evaluation in a Trainer's log_history (trainer_state.json), {} if none ran."""
    evaluations = [entry for entry in log_history if any(key.startswith("eval_") for key in entry)]
    if not evaluations:
        return {}
    last = evaluations[-1]
    return {key: value for key, value in last.items() if key.startswith("eval_") and isinstance(value, (int, float))}


def card_metadata(directory) -> dict:
    """The YAML metadata of a model card in `directory` ({} without one), e.g. to carry base model and dataset
    from an adapter's card to its merged model's."""
    path = os.path.join(directory, CARD_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text[4 : text.index("\n---", 4)]) or {}


def coordinates_text(settings) -> str:
    if settings.coordinate_system == MODEL_FRAME_0_1000:
        return (
            "integers 0-1000 of the resized image (equally, of the original: the resize never crops): "
            "`x_original = x / 1000 * original_width`, `y_original = y / 1000 * original_height`."
        )
    return (
        "absolute pixels of the resized image (the frame above), not of the original: "
        "`x_original = x * original_width / frame_width`, `y_original = y * original_height / frame_height`."
    )


def write_model_card(directory, settings, base_model, dataset=None, metrics=None, adapter=False, name=None) -> None:
    """README.md in `directory` for a model trained with `settings` (utils.ImageSettings) from `base_model`
    on `dataset`, with the `metrics` of its last evaluation when there are any. `adapter`: a LoRA adapter;
    `name`: the model's (default: the directory's)."""
    family = FAMILIES[settings.model_family]
    name = name or os.path.basename(os.path.normpath(directory))
    metadata = {
        "base_model": base_model,
        **({"datasets": [dataset]} if dataset else {}),
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["visual-grounding", settings.model_family],
    }
    if metrics:
        result = {
            "task": {"type": "visual-grounding", "name": "Visual grounding"},
            "dataset": {"name": dataset or "evaluation set", "type": dataset or "local"},
            "metrics": [{"type": key, "name": key, "value": value} for key, value in metrics.items()],
        }
        metadata["model-index"] = [{"name": name, "results": [result]}]
    factor = settings.patch_size * settings.merge_size
    serve = (
        f"Merge the adapter first (`python scripts/merge_model.py --base_model {base_model} --adapter {name} "
        "--output_dir merged`), then serve the merged directory as below."
        if adapter
        else f"`transformers serve {name} --port 8000`, or `vllm serve {name} --generation-config vllm`, then "
        f"evaluate through it with `python infer.py --backend openai --base_url http://localhost:8000/v1 "
        f"--model_name_or_path {name} --test_dataset_name test.jsonl --output_dir eval`."
    )
    lines = [
        "---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---",
        f"# {name}", "",
        f"{family.name} ({base_model}) fine-tuned for visual grounding"
        + (f" on {dataset}" if dataset else "")
        + ': a question about one image in, `{"bbox_2d": [x1, y1, x2, y2]}` out.', "",
        "## Image frame: resize before the processor", "",
        f"Training resized every image so its longer side is {settings.max_image_side} px, then snapped it with "
        f"Qwen's smart_resize to multiples of {factor} px within [{settings.min_pixels}, {settings.max_pixels}] "
        f"pixels ({IMAGE_SETTINGS_FILE}). Resize the same way before the processor or a server sees the image: "
        "given the original, they pick another frame and the answer's numbers mean something else.", "",
        "## Prompt", "",
        "One user turn with the chat template saved here: the image, then the question followed by", "",
        f"> {PROMPT_SUFFIX}", "",
        "## Coordinates", "",
        f"Answers are {coordinates_text(settings)}", "",
        "## Decoding", "",
        "Greedy, repetition penalty 1.0: the evaluation ignores a `repetition_penalty` in generation_config.json "
        "(the base Qwen models set 1.05, which penalises the digits a box repeats).", "",
        "## Serve", "",
        serve, f"See {REPO_GUIDE}.", "",
    ]  # fmt: skip
    if metrics:
        lines += ["## Last evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in metrics.items()] + [""]
    write_text_atomic(os.path.join(directory, CARD_FILE), "\n".join(lines))
