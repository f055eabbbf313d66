"""Model families: each family's answers mapped back to original pixels by infer.py, Qwen3-VL
through every entry point (sft.py, LoRA, merge_model.py, infer.py), and the refusals (unsupported
family, settings file of another family). The collator's per-family checks live in test_collator.py."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import scoring
import training
from answers import format_answer, parse_bbox
from conftest import run_script, train, train_lora
from model_families import FAMILIES, MODEL_FRAME_0_1000, detect_family
from utils import IMAGE_SETTINGS_FILE, ImageSettings

QWEN2_5_VL, QWEN3_VL = FAMILIES["qwen2_5_vl"], FAMILIES["qwen3_vl"]


def test_families_are_detected_from_config_and_read_the_processor(tiny_model_dir, tiny_qwen3_vl_dir):
    assert detect_family(tiny_model_dir) is QWEN2_5_VL and detect_family(tiny_qwen3_vl_dir) is QWEN3_VL
    settings = ImageSettings.from_processor(AutoProcessor.from_pretrained(tiny_qwen3_vl_dir), 112, QWEN3_VL)
    # Qwen3-VL's processor: 16 px patches merged 2 x 2, so 32 px per token; never assumed, read.
    assert (settings.patch_size, settings.merge_size) == (16, 2)
    assert (settings.model_family, settings.coordinate_system) == ("qwen3_vl", MODEL_FRAME_0_1000)


def blank_image_rows(directory, sizes):
    """One plain image per (width, height), each asked for one box (the first: the whole image).
    Returns the collator rows and {query: (true box in original pixels, (width, height))}."""
    rows, samples = [], {}
    for index, (width, height) in enumerate(sizes):
        path = os.path.join(directory, f"{index}.png")
        Image.new("RGB", (width, height), (200, 200, 200)).save(path)
        box = [0.137 * width, 0.211 * height, 0.773 * width, 0.9 * height] if index else [0, 0, width, height]
        query = f"where is object number {index}?"
        rows.append({"image": [path], "user": query, "assistant": format_answer(box)})
        samples[query] = (box, (width, height))
    return rows, samples


class ScriptedModel:
    """Stands in for the model in the mapping tests only. It answers each prompt with the true box in
    the frame the processor really fed the model (read from image_grid_thw, not from utils), written
    by `write(box in frame pixels, frame (width, height))`, so any error in mapping back shows."""

    def __init__(self, processor, samples, write):
        self.device = torch.device("cpu")
        self.processor = processor
        self.samples = samples  # query -> (true box in original pixels, original (width, height))
        self.write = write

    def generate(self, input_ids, image_grid_thw, **kwargs):
        tokenizer = self.processor.tokenizer
        patch = self.processor.image_processor.patch_size
        answers = []
        for ids, (_, grid_h, grid_w) in zip(input_ids, image_grid_thw.tolist()):
            prompt = tokenizer.decode(ids, skip_special_tokens=True)
            (x1, y1, x2, y2), (width, height) = next(s for query, s in self.samples.items() if query in prompt)
            frame = (grid_w * patch, grid_h * patch)
            scale_x, scale_y = frame[0] / width, frame[1] / height
            frame_box = [x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y]
            answers.append(tokenizer.encode(json.dumps({"bbox_2d": self.write(frame_box, frame)}) + "<|im_end|>"))
        longest = max(map(len, answers))
        padded = [answer + [tokenizer.pad_token_id] * (longest - len(answer)) for answer in answers]
        return torch.cat([input_ids, torch.tensor(padded)], dim=1)


def write_pixels(frame_box, frame):  # Qwen2.5-VL: pixels of the frame, to 4 decimals so any mapping error shows
    return [round(v, 4) for v in frame_box]


def write_0_1000(frame_box, frame):  # Qwen3-VL: whole 0-1000 units of the frame, as the model writes them
    return [round(v / frame[i % 2] * 1000) for i, v in enumerate(frame_box)]


@pytest.mark.parametrize(
    "family, write, tolerance",
    [
        (QWEN2_5_VL, write_pixels, lambda side: 0.01),
        # A 0-1000 unit is side / 1000 px: rounding to it costs at most half of that.
        (QWEN3_VL, write_0_1000, lambda side: side / 1000 + 0.5),
    ],
    ids=["qwen2_5_vl", "qwen3_vl"],
)
def test_predictions_map_back_to_original_pixels(family, write, tolerance, tiny_model_dir, tiny_qwen3_vl_dir, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_model_dir if family is QWEN2_5_VL else tiny_qwen3_vl_dir)
    # Square, wide, tall, TextVQA-like, odd sizes, smaller than the model frame (upscaled), and large.
    sizes = [(150, 150), (1300, 200), (200, 1300), (1024, 681), (333, 777), (640, 480), (97, 61), (4000, 3000)]
    rows, samples = blank_image_rows(tmp_path, sizes)
    model = ScriptedModel(processor, samples, write)
    for max_image_side in (64, 224, 448):
        settings = ImageSettings.from_processor(processor, max_image_side, family)
        predictions = scoring.predict(model, processor, rows, settings, 3, 64, show_progress=False)
        for row, prediction in zip(rows, predictions):
            true_box, (width, height) = samples[row["user"]]
            limits = [tolerance(width), tolerance(height)] * 2
            errors = [abs(p - t) for p, t in zip(prediction["pred_bbox"], true_box)]
            assert all(e <= limit for e, limit in zip(errors, limits)), (row["image"], max_image_side, errors)


def test_freeze_switches_cover_qwen3_vl_deepstack_projectors(tiny_qwen3_vl_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3_vl_dir)
    switches = SimpleNamespace(freeze_vision_tower=True, freeze_merger=False, freeze_llm=True)
    training.freeze_parts(model, switches, QWEN3_VL)
    trainable = {name.split(".")[2] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"merger", "deepstack_merger_list"}


# ---------------------------------------------------------------- entry points
def infer_cli(*args, output_dir, check=True):
    result = run_script(
        "infer.py", *args, "--output_dir", output_dir, "--batch_size", 4, "--max_new_tokens", 40,
        env={"OMP_NUM_THREADS": "1"}, check=check,
    )  # fmt: skip
    if not check:
        return result
    with open(os.path.join(output_dir, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def answering_qwen3_vl(tiny_qwen3_vl_dir, data_dir, tmp_path_factory):
    """The tiny Qwen3-VL fully trained by sft.py until it answers the first 4 test samples."""
    output_dir = tmp_path_factory.mktemp("answering_qwen3_vl") / "model"
    return train(
        tiny_qwen3_vl_dir, data_dir / "first4.jsonl", output_dir,
        "--max_steps", 150, "--learning_rate", 5e-3, "--lr_scheduler_type", "constant",
    )  # fmt: skip


def test_sft_lora_merge_infer_on_qwen3_vl(answering_qwen3_vl, data_dir, tmp_path):
    with open(os.path.join(answering_qwen3_vl, IMAGE_SETTINGS_FILE)) as f:
        saved = json.load(f)
    assert (saved["model_family"], saved["coordinate_system"]) == ("qwen3_vl", MODEL_FRAME_0_1000)
    test_set = ["--test_dataset_name", data_dir / "test.jsonl", "--num_vis", 0]
    full = infer_cli("--model_name_or_path", answering_qwen3_vl, *test_set, output_dir=tmp_path / "full")
    # It learned 0-1000 answers; read back as original pixels they land on the memorised boxes.
    raw_boxes = [parse_bbox(p["raw_output"]) for p in full[:4]]
    assert all(box and all(0 <= v <= 1000 for v in box) for box in raw_boxes), [p["raw_output"] for p in full]
    assert sum(p["iou"] > 0.5 for p in full[:4]) >= 3, [p["raw_output"] for p in full]

    adapter_dir = train_lora(answering_qwen3_vl, data_dir / "test.jsonl", tmp_path / "lora", max_steps=20)
    merged_dir = tmp_path / "merged"
    merge = ["--base_model", answering_qwen3_vl, "--adapter", adapter_dir, "--output_dir", merged_dir]
    run_script("scripts/merge_model.py", *merge)
    assert AutoModelForImageTextToText.from_pretrained(merged_dir).config.model_type == "qwen3_vl"
    merged = infer_cli("--model_name_or_path", merged_dir, *test_set, output_dir=tmp_path / "merged_eval")
    adapted = infer_cli(
        "--model_name_or_path", answering_qwen3_vl, "--adapter", adapter_dir, *test_set,
        output_dir=tmp_path / "lora_eval",
    )
    assert merged == adapted
    assert [p["raw_output"] for p in merged] != [p["raw_output"] for p in full]  # the LoRA changed it


def copy_model(model_dir, destination, model_type=None):
    shutil.copytree(model_dir, destination)
    if model_type:
        config_path = os.path.join(destination, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        with open(config_path, "w") as f:
            json.dump({**config, "model_type": model_type}, f)
    return str(destination)


@pytest.mark.parametrize("model_type", ["qwen3_5", "llava"])
def test_unsupported_family_is_refused_naming_it_and_the_supported_ones(
    tiny_qwen3_vl_dir, data_dir, tmp_path, model_type
):
    model_dir = copy_model(tiny_qwen3_vl_dir, tmp_path / "model", model_type)
    result = infer_cli("--model_name_or_path", model_dir, "--test_dataset_name", data_dir / "test.jsonl",
                       output_dir=tmp_path / "out", check=False)  # fmt: skip
    assert result.returncode != 0
    assert f"model_type {model_type!r} is not supported" in result.stderr
    assert "qwen2_5_vl (Qwen2.5-VL), qwen3_vl (Qwen3-VL)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_settings_of_another_family_are_refused_naming_both(tiny_qwen3_vl_dir, tiny_model_dir, data_dir, tmp_path):
    model_dir = copy_model(tiny_qwen3_vl_dir, tmp_path / "model")
    ImageSettings.from_processor(AutoProcessor.from_pretrained(tiny_model_dir), 64, QWEN2_5_VL).save(model_dir)
    result = infer_cli("--model_name_or_path", model_dir, "--test_dataset_name", data_dir / "test.jsonl",
                       output_dir=tmp_path / "out", check=False)  # fmt: skip
    assert result.returncode != 0
    settings_file = f"{model_dir}/{IMAGE_SETTINGS_FILE}"
    for named in (settings_file, "qwen2_5_vl", "model_frame_pixels", "qwen3_vl", "model_frame_0_1000"):
        assert named in result.stderr, result.stderr
