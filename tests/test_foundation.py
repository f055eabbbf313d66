import os
import re
import subprocess

import datasets
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from answers import build_messages, format_answer
from conftest import REPO_DIR
from model_families import FAMILIES
from utils import ImageSettings, model_frame_size, to_model_frame

QWEN2_5_VL = FAMILIES["qwen2_5_vl"]


def test_tiny_model_loads_trains_and_generates(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    tokenizer = processor.tokenizer
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert tokenizer.tokenize("1234") == ["1", "2", "3", "4"]  # digits are single tokens

    image = Image.new("RGB", (200, 130), (250, 250, 250))
    prompt = processor.apply_chat_template(build_messages("where is the red square?"), add_generation_prompt=True)
    inputs = processor(text=[prompt + format_answer([1, 2, 3, 4]) + "<|im_end|>"], images=[image], return_tensors="pt")
    num_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert num_image_tokens == int(inputs["image_grid_thw"].prod()) // 4

    output = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # gradient reaches the vision tower

    prompt_inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    generated = model.generate(**prompt_inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt_inputs["input_ids"].shape[1] + 4


def test_tiny_model_respects_size_flags(tmp_path):
    from conftest import run_script

    run_script("scripts/make_tiny_model.py", "--output_dir", tmp_path, "--hidden_size", 64, "--num_layers", 2)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config.text_config.hidden_size == 64
    assert model.config.text_config.num_hidden_layers == 2


def test_synthetic_data_has_textvqa_schema_and_valid_boxes(synthetic_dataset_dir):
    dataset = datasets.load_dataset(synthetic_dataset_dir, split="train")
    assert set(dataset.column_names) == {"image", "question", "answer", "dataset_id", "bbox"}
    assert isinstance(dataset.features["image"], datasets.Image)
    widths, heights = [], []
    for row in dataset:
        width, height = row["image"].size
        widths.append(width)
        heights.append(height)
        x, y, box_w, box_h = row["bbox"]
        assert box_w > 0 and box_h > 0
        assert x >= 0 and y >= 0 and x + box_w <= width and y + box_h <= height
        assert row["question"].startswith("where is the ")
        assert isinstance(row["answer"], list) and row["answer"]
    sides = widths + heights
    assert min(sides) < 400 and max(sides) > 900  # wide range of sizes
    assert any(w > h for w, h in zip(widths, heights)) and any(h > w for w, h in zip(widths, heights))


def test_target_object_is_where_the_box_says(synthetic_dataset_dir):
    dataset = datasets.load_dataset(synthetic_dataset_dir, split="train")
    for row in dataset.select(range(10)):
        image = row["image"].convert("RGB")
        x, y, box_w, box_h = row["bbox"]
        center = image.getpixel((int(x + box_w / 2), int(y + box_h / 2)))
        outside = image.getpixel((int(x) - 1, int(y + box_h / 2))) if x >= 1 else None
        assert center != outside


def test_model_frame_matches_processor_grid(processor):
    """Our frame maths equals the processor's own smart_resize: its resize becomes a no-op."""
    patch = processor.image_processor.patch_size
    for max_side in (224, 448, 1024):
        settings = ImageSettings.from_processor(processor, max_side, QWEN2_5_VL)
        for width, height in [(150, 150), (1300, 200), (200, 1300), (1024, 681), (333, 777), (640, 480)]:
            image = to_model_frame(Image.new("RGB", (width, height)), settings)
            grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
            assert image.size == (grid[2] * patch, grid[1] * patch)
            assert image.size == model_frame_size(width, height, settings)


def test_no_hard_coded_token_ids():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO_DIR, capture_output=True, text=True).stdout.split()
    for path in tracked + [p for p in os.listdir(REPO_DIR) if p.endswith(".py")]:
        with open(os.path.join(REPO_DIR, path)) as f:
            assert not re.search(r"\b1516\d\d\b", f.read()), f"{path} hard-codes a Qwen token id"
