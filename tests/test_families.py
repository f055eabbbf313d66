"""Model families: Qwen3-VL through every entry point (sft.py, merge_model.py, infer.py), its
0-1000 answers mapped back to original pixels, and the refusals (unsupported family, settings
file of another family). The collator's per-family checks live in test_collator.py."""

import glob
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import infer
import sft
from conftest import run_script
from model_families import FAMILIES, MODEL_FRAME_0_1000, detect_family
from utils import IMAGE_SETTINGS_FILE, ImageSettings, format_answer, parse_bbox

QWEN2_5_VL, QWEN3_VL = FAMILIES["qwen2_5_vl"], FAMILIES["qwen3_vl"]


def test_families_are_detected_from_config_and_read_the_processor(tiny_model_dir, tiny_qwen3_vl_dir):
    assert detect_family(tiny_model_dir) is QWEN2_5_VL and detect_family(tiny_qwen3_vl_dir) is QWEN3_VL
    settings = ImageSettings.from_processor(AutoProcessor.from_pretrained(tiny_qwen3_vl_dir), 112, QWEN3_VL)
    # Qwen3-VL's processor: 16 px patches merged 2 x 2, so 32 px per token; never assumed, read.
    assert (settings.patch_size, settings.merge_size) == (16, 2)
    assert (settings.model_family, settings.coordinate_system) == ("qwen3_vl", MODEL_FRAME_0_1000)


class ZeroTo1000Model:
    """Stands in for Qwen3-VL in the mapping test only: it answers each prompt with the true box in
    whole 0-1000 units of the frame the processor really fed the model (read from image_grid_thw)."""

    device = torch.device("cpu")

    def __init__(self, processor, samples):
        self.processor = processor
        self.samples = samples  # query -> (true box in original pixels, original (width, height))

    def generate(self, input_ids, image_grid_thw, **kwargs):
        tokenizer = self.processor.tokenizer
        patch = self.processor.image_processor.patch_size
        answers = []
        for ids, (_, grid_h, grid_w) in zip(input_ids, image_grid_thw.tolist()):
            prompt = tokenizer.decode(ids, skip_special_tokens=True)
            box, (width, height) = next(s for query, s in self.samples.items() if query in prompt)
            frame = (grid_w * patch, grid_h * patch)
            in_frame = [v * frame[i % 2] / (width, height)[i % 2] for i, v in enumerate(box)]
            relative = [round(v / frame[i % 2] * 1000) for i, v in enumerate(in_frame)]
            answers.append(tokenizer.encode(json.dumps({"bbox_2d": relative}) + "<|im_end|>"))
        longest = max(map(len, answers))
        padded = [answer + [tokenizer.pad_token_id] * (longest - len(answer)) for answer in answers]
        return torch.cat([input_ids, torch.tensor(padded)], dim=1)


def test_0_1000_predictions_map_back_to_original_pixels(tiny_qwen3_vl_dir, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_qwen3_vl_dir)
    sizes = [(150, 150), (1300, 200), (200, 1300), (1024, 681), (333, 777), (97, 61), (4000, 3000)]
    rows, samples = [], {}
    for index, (width, height) in enumerate(sizes):
        path = str(tmp_path / f"{index}.png")
        Image.new("RGB", (width, height), (200, 200, 200)).save(path)
        box = [0.137 * width, 0.211 * height, 0.773 * width, 0.9 * height] if index else [0, 0, width, height]
        query = f"where is object number {index}?"
        rows.append({"image": [path], "user": query, "assistant": format_answer(box)})
        samples[query] = (box, (width, height))
    model = ZeroTo1000Model(processor, samples)
    for max_image_side in (64, 224):
        settings = ImageSettings.from_processor(processor, max_image_side, QWEN3_VL)
        predictions = infer.predict(model, processor, rows, settings, 3, 64, show_progress=False)
        for row, prediction in zip(rows, predictions):
            true_box, (width, height) = samples[row["user"]]
            # One 0-1000 unit is width / 1000 px; rounding to it costs at most half of that.
            tolerance = [width / 1000 + 0.5, height / 1000 + 0.5] * 2
            errors = [abs(p - t) for p, t in zip(prediction["pred_bbox"], true_box)]
            assert all(e <= t for e, t in zip(errors, tolerance)), (row["image"], max_image_side, errors)


def test_freeze_switches_cover_qwen3_vl_deepstack_projectors(tiny_qwen3_vl_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3_vl_dir)
    switches = SimpleNamespace(freeze_vision_tower=True, freeze_merger=False, freeze_llm=True)
    sft.freeze_parts(model, switches, QWEN3_VL)
    trainable = {name.split(".")[2] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"merger", "deepstack_merger_list"}


# ---------------------------------------------------------------- entry points
@pytest.fixture(scope="module")
def data_dir(synthetic_dataset_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("families_data")
    run_script(
        "scripts/convert2sft_format.py", "--data_path", synthetic_dataset_dir, "--save_path", data_dir,
        "--type", "test", "--train_range", "8:40", "--test_range", "0:8", "--num_workers", 1,
    )  # fmt: skip
    lines = (data_dir / "test.jsonl").read_text().splitlines(keepends=True)
    (data_dir / "first4.jsonl").write_text("".join(lines[:4]))
    return data_dir


def train(model_dir, train_file, output_dir, *extra_args):
    run_script(
        "sft.py", "--config", "configs/tiny_cpu.yaml", "--model_name_or_path", model_dir,
        "--train_dataset_name", train_file, "--output_dir", output_dir, "--max_image_side", 64,
        "--per_device_train_batch_size", 4, "--save_strategy", "no", *extra_args,
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    (run_dir,) = glob.glob(f"{output_dir.parent}/*_{output_dir.name}")
    return run_dir


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

    adapter_dir = train(
        answering_qwen3_vl, data_dir / "test.jsonl", tmp_path / "lora",
        "--use_lora", "true", "--r", 8, "--lora_alpha", 16, "--target_modules", "q_proj", "v_proj",
        "--max_steps", 20, "--learning_rate", 1e-2,
    )  # fmt: skip
    merged_dir = tmp_path / "merged"
    run_script("scripts/merge_model.py", "--base_model", answering_qwen3_vl, "--adapter", adapter_dir, "--output_dir", merged_dir)
    assert AutoModelForImageTextToText.from_pretrained(merged_dir).config.model_type == "qwen3_vl"
    merged = infer_cli("--model_name_or_path", merged_dir, *test_set, output_dir=tmp_path / "merged_eval")
    adapted = infer_cli(
        "--model_name_or_path", answering_qwen3_vl, "--adapter", adapter_dir, *test_set, output_dir=tmp_path / "lora_eval"
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
    for named in (f"{model_dir}/{IMAGE_SETTINGS_FILE}", "qwen2_5_vl", "model_frame_pixels", "qwen3_vl", "model_frame_0_1000"):
        assert named in result.stderr, result.stderr
