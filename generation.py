"""Generation with HF `generate`: converter rows in, prediction records out, boxes in original pixels with a
confidence each. `prediction_from_answer` turns one raw answer into a record; every backend (this one,
backends.py's OpenAI-compatible server) ends there, so none can differ in parsing or mapping back.
"""

import warnings

import torch
from tqdm import tqdm
from transformers import GenerationConfig

from answers import BOXES, answer_kind, parse_bbox, parse_boxes, render_prompt
from confidence import DEFAULT_CONFIDENCE_RULE, box_confidences, token_pieces
from model_families import box_from_answer
from utils import check_processor_kept_frame, load_image, to_model_frame


def plain_greedy(checkpoint_config: GenerationConfig) -> GenerationConfig:
    """Greedy decoding with nothing else from the checkpoint but its special tokens: no repetition
    penalty, no sampling, no beams (generate fills unset values from model.generation_config, so the
    checkpoint's config is replaced rather than overridden)."""
    tokens = ("bos_token_id", "eos_token_id", "pad_token_id")
    return GenerationConfig(do_sample=False, num_beams=1, **{name: getattr(checkpoint_config, name) for name in tokens})


@torch.no_grad()
def predict(
    model, processor, rows, settings, batch_size, max_new_tokens, show_progress=True, confidence_rule=DEFAULT_CONFIDENCE_RULE
) -> list[dict]:
    """Generation in batches with the model's generation_config (infer.py and training make it plain_greedy).

    Returns per row {"raw_output", "pred_bbox" (original pixels), "image_size", "error"}. An image
    that cannot be decoded is left out of its batch, warned about and returned with its reason in
    "error", so one bad file does not stop a long evaluation.
    """
    processor.tokenizer.padding_side = "left"  # generation continues from the last position of every row
    predictions = []
    for start in tqdm(range(0, len(rows), batch_size), desc="generating", disable=not show_progress):
        batch_results, batch, originals, images = [], [], [], []
        for row in rows[start : start + batch_size]:
            try:
                original = load_image(row["image"][0])
                image = to_model_frame(original, settings)
            except ValueError as error:
                warnings.warn(f"sample left out of the scores: {error}")
                batch_results.append(failed_prediction(error))
                continue
            batch_results.append(None)  # filled below, in order
            batch.append(row)
            originals.append(original)
            images.append(image)
        answered = iter(generate_boxes(model, processor, batch, images, originals, settings, max_new_tokens, confidence_rule))
        predictions.extend(result or next(answered) for result in batch_results)
    return predictions


def generate_boxes(model, processor, batch, images, originals, settings, max_new_tokens, confidence_rule) -> list[dict]:
    """One generate call for the readable samples of a batch; boxes mapped from the model frame to original
    pixels, each with its confidence (confidence.py) from the log-probabilities of the generated tokens."""
    if not batch:
        return []
    prompts = [render_prompt(processor, row["user"], answer_kind(row["assistant"])) for row in batch]
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt").to(model.device)
    for row, image, image_grid_thw in zip(batch, images, inputs["image_grid_thw"].tolist()):
        check_processor_kept_frame(row["image"][0], image.size, image_grid_thw, settings.patch_size)
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, output_scores=True, return_dict_in_generate=True)
    answer_ids = generated.sequences[:, inputs["input_ids"].shape[1] :].tolist()
    logprobs = model.compute_transition_scores(generated.sequences, generated.scores, normalize_logits=True).tolist()
    predictions = []
    for ids, token_logprobs, row, image, original in zip(answer_ids, logprobs, batch, images, originals):
        pieces = token_pieces(processor.tokenizer, ids)
        kind = answer_kind(row["assistant"])
        scored_tokens = (pieces, token_logprobs)
        predictions.append(
            prediction_from_answer("".join(pieces), kind, image.size, original.size, settings, scored_tokens, confidence_rule)
        )
    return predictions


def prediction_from_answer(
    text, kind, model_size, original_size, settings, scored_tokens=None, confidence_rule=DEFAULT_CONFIDENCE_RULE
) -> dict:
    """One raw answer as a prediction record, its boxes mapped from the model frame to original pixels:
    {"raw_output", "pred_bbox", "confidence", "image_size", "error"} for a single-box row (the first box found,
    or None); for a list row "pred_boxes" ([{"bbox_2d", "label", "confidence"}], duplicates kept) and
    "well_formed" (parse_boxes) instead. scored_tokens: (token texts, their log-probabilities) of the
    answer, when the backend gives them; otherwise confidences are None. Every generation path ends here."""
    record = {"raw_output": text, "image_size": list(original_size), "error": None}
    confidences = box_confidences(*scored_tokens, kind, confidence_rule) if scored_tokens else []
    if kind == BOXES:
        objects, well_formed = parse_boxes(text)
        if len(confidences) != len(objects):  # only when a box's numbers were written in a form the spans miss
            confidences = [None] * len(objects)
        objects = [
            {
                **item,
                "bbox_2d": box_from_answer(item["bbox_2d"], settings.coordinate_system, model_size, original_size),
                "confidence": confidence,
            }
            for item, confidence in zip(objects, confidences)
        ]
        return {**record, "pred_boxes": objects, "well_formed": well_formed}
    box = parse_bbox(text)
    box = None if box is None else box_from_answer(box, settings.coordinate_system, model_size, original_size)
    confidence = confidences[0] if box is not None and confidences else None
    return {**record, "pred_bbox": box, "confidence": confidence}


def failed_prediction(error) -> dict:
    """The record of a sample that got no answer (an unreadable image, a request that failed): kept in
    predictions.jsonl, left out of the scores, counted in metrics' failed_samples."""
    return {"raw_output": None, "pred_bbox": None, "image_size": None, "error": str(error)}
