"""Model families: each family's answers mapped back to original pixels by infer.py, Qwen3-VL and Qwen3.5
through every entry point (sft.py, LoRA, merge_model.py, infer.py; grpo.py for Qwen3.5), Qwen3.5's targets,
prompt, rope index and packing refusal, and the refusals (unsupported family, settings file of another
family). The collator's per-family checks live in test_collator.py."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import generation
import training
from answers import build_messages, format_answer, parse_bbox, read_answer_box, render_prompt
from conftest import assert_same_predictions, run_script, train_lora
from model_families import FAMILIES, MODEL_FRAME_0_1000, detect_family, linear_attention_kernels_available
from test_collator import per_sample_losses
from test_grpo import grpo, step_records
from utils import IMAGE_SETTINGS_FILE, ImageSettings, load_sft_jsonl, model_frame_size
from vision_datacollator import GroundingCollator

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
        # What generate(..., output_scores=True, return_dict_in_generate=True) returns: one score row per step.
        return SimpleNamespace(sequences=torch.cat([input_ids, torch.tensor(padded)], dim=1), scores=(None,) * longest)

    def compute_transition_scores(self, sequences, scores, normalize_logits):
        return torch.zeros(len(sequences), len(scores))  # every token certain: confidence 1


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
        predictions = generation.predict(model, processor, rows, settings, 3, 64, show_progress=False)
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
def answering_qwen3_vl(answering_model):
    return answering_model("qwen3_vl")


@pytest.fixture(scope="module")
def answering_qwen3_5(answering_model):
    return answering_model("qwen3_5")


@pytest.mark.parametrize("model_type", ["qwen3_vl", "qwen3_5"])
def test_sft_lora_merge_infer(model_type, data_dir, tmp_path, request):
    answering_model = request.getfixturevalue(f"answering_{model_type}")
    with open(os.path.join(answering_model, IMAGE_SETTINGS_FILE)) as f:
        saved = json.load(f)
    assert (saved["model_family"], saved["coordinate_system"]) == (model_type, MODEL_FRAME_0_1000)
    test_set = ["--test_dataset_name", data_dir / "test.jsonl", "--num_vis", 0]
    full = infer_cli("--model_name_or_path", answering_model, *test_set, output_dir=tmp_path / "full")
    # It learned 0-1000 answers; read back as original pixels they land on the memorised boxes.
    raw_boxes = [parse_bbox(p["raw_output"]) for p in full[:4]]
    assert all(box and all(0 <= v <= 1000 for v in box) for box in raw_boxes), [p["raw_output"] for p in full]
    assert sum(p["iou"] > 0.5 for p in full[:4]) >= 3, [p["raw_output"] for p in full]

    adapter_dir = train_lora(answering_model, data_dir / "test.jsonl", tmp_path / "lora", max_steps=20)
    merged_dir = tmp_path / "merged"
    merge = ["--base_model", answering_model, "--adapter", adapter_dir, "--output_dir", merged_dir]
    run_script("scripts/merge_model.py", *merge)
    assert AutoModelForImageTextToText.from_pretrained(merged_dir).config.model_type == model_type
    merged = infer_cli("--model_name_or_path", merged_dir, *test_set, output_dir=tmp_path / "merged_eval")
    adapted = infer_cli(
        "--model_name_or_path", answering_model, "--adapter", adapter_dir, *test_set,
        output_dir=tmp_path / "lora_eval",
    )
    assert_same_predictions(merged, adapted)
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


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava"])
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


# ---------------------------------------------------------------- Qwen3.5
QWEN3_5 = FAMILIES["qwen3_5"]


@pytest.fixture(scope="module")
def qwen3_5(tiny_qwen3_5_dir):
    """(processor, model) of the tiny Qwen3.5, as sft.py loads them."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3_5_dir).eval()
    return AutoProcessor.from_pretrained(tiny_qwen3_5_dir), model


def test_qwen3_5_targets_are_0_1000_after_the_same_prompt_as_inference(qwen3_5, tiny_qwen3_5_dir, collator_rows):
    processor, _ = qwen3_5
    assert detect_family(tiny_qwen3_5_dir) is QWEN3_5 and type(processor).__name__ == "Qwen3VLProcessor"
    collator = GroundingCollator(processor, max_img_side_length=224, family=QWEN3_5)
    assert (collator.image_settings.patch_size, collator.image_settings.merge_size) == (16, 2)
    for row in collator_rows[:4]:
        original_size = Image.open(row["image"][0]).size
        frame = model_frame_size(*original_size, collator.image_settings)
        prompt, answer = collator.prompt_and_answer(row, original_size, frame)
        box = read_answer_box(row["assistant"])
        expected = [round(v / original_size[i % 2] * 1000) for i, v in enumerate(box)]
        assert max(abs(a - b) for a, b in zip(parse_bbox(answer), expected)) <= 1, (answer, expected)
        # Qwen3.5's template writes a finished answer after an empty think block; trained prompt + answer must be
        # that text, and the prompt the one infer.py and grpo.py render, so no think block is in the answer.
        conversation = build_messages(row["user"]) + [{"role": "assistant", "content": answer.removesuffix("<|im_end|>")}]
        assert prompt + answer + "\n" == processor.apply_chat_template(conversation)
        assert prompt == render_prompt(processor, row["user"]) and prompt.endswith("assistant\n<think>\n\n</think>\n\n")
        assert "think>" not in answer


def test_qwen3_5_position_ids_are_its_get_rope_index(qwen3_5, collator_rows):
    processor, model = qwen3_5
    batch = GroundingCollator(processor, max_img_side_length=224, family=QWEN3_5)(collator_rows[:4])
    reference, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], attention_mask=batch["attention_mask"]
    )
    padding = batch["attention_mask"] == 0
    assert padding.any() and torch.equal(batch["position_ids"][:, ~padding], reference[:, ~padding])


def test_packed_qwen3_5_is_refused_as_the_torch_fallback_mixes_samples(answering_qwen3_5, data_dir):
    processor = AutoProcessor.from_pretrained(answering_qwen3_5)
    model = AutoModelForImageTextToText.from_pretrained(answering_qwen3_5).eval()
    with pytest.raises(ValueError, match="packed.*qwen3_5.*flash-linear-attention and causal-conv1d"):
        GroundingCollator(processor, max_img_side_length=56, padding="packed", family=QWEN3_5)
    # What the refusal prevents, on the samples the model learned: packed by hand, as the collator would pack them.
    collator = GroundingCollator(processor, max_img_side_length=56, padding="longest", family=QWEN3_5)
    rows = load_sft_jsonl(str(data_dir / "first4.jsonl"))
    longest = collator(rows)
    images = {key: longest[key] for key in ("pixel_values", "image_grid_thw")}
    packed = images | collator._pack([collator.encode(row) for row in rows])
    # Given the samples' boundaries, transformers' torch fallback stops rather than ignore them ...
    with pytest.raises(ValueError, match="can't keep packed sequences apart"):
        model(**packed)
    # ... and without them it runs each packed row as one sequence: every sample after the first reads the ones
    # before it through the Gated DeltaNet layers' state and convolution, so its loss is not its `longest` loss.
    unmarked = {key: value for key, value in packed.items() if key not in ("cu_seq_lens_q", "seq_idx")}
    lengths = longest["attention_mask"].sum(1).tolist()
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    longest_losses = per_sample_losses(model, longest, [(i, slice(0, n)) for i, n in enumerate(lengths)])
    packed_losses = per_sample_losses(model, unmarked, [(0, slice(s, s + n)) for s, n in zip(starts, lengths)])
    assert packed_losses[0] == pytest.approx(longest_losses[0], rel=1e-4)
    for packed_loss, longest_loss in zip(packed_losses[1:], longest_losses[1:]):  # Qwen3-VL's parity tolerance
        assert packed_loss != pytest.approx(longest_loss, rel=1e-4, abs=1e-4), (packed_losses, longest_losses)
    assert max(p / l for p, l in zip(packed_losses, longest_losses)) > 1.5, (packed_losses, longest_losses)


def test_grpo_on_qwen3_5_trains_and_infers(answering_qwen3_5, data_dir, tmp_path):
    output_dir = tmp_path / "grpo"
    grpo("--model_name_or_path", answering_qwen3_5, "--train_dataset_name", data_dir / "first4.jsonl",
         "--output_dir", output_dir, "--max_steps", 2, "--max_completion_length", 24, "--save_strategy", "no")  # fmt: skip
    run_dir = output_dir.parent / "cpu_grpo"
    assert [entry["step"] for entry in step_records(run_dir)] == [1, 2]
    predictions = infer_cli("--model_name_or_path", run_dir, "--test_dataset_name", data_dir / "first4.jsonl",
                            output_dir=tmp_path / "grpo_eval")  # fmt: skip
    assert all(parse_bbox(p["raw_output"]) for p in predictions), [p["raw_output"] for p in predictions]


@pytest.mark.skipif(not linear_attention_kernels_available(), reason="needs CUDA, flash-linear-attention, causal-conv1d")
def test_packed_qwen3_5_loss_equals_longest_with_the_kernels(qwen3_5, collator_rows):
    """The GPU check (docs/families.md): with the kernels the collator packs Qwen3.5 and passes the boundaries."""
    processor, model = qwen3_5
    model = model.cuda()
    rows = collator_rows[:4]
    batches = [
        {key: value.cuda() if torch.is_tensor(value) else value for key, value in batch.items()}
        for batch in (
            GroundingCollator(processor, max_img_side_length=224, padding=padding, family=QWEN3_5)(rows)
            for padding in ("longest", "packed")
        )
    ]
    longest, packed = batches
    lengths = longest["attention_mask"].sum(1).tolist()
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    longest_losses = per_sample_losses(model, longest, [(i, slice(0, n)) for i, n in enumerate(lengths)])
    packed_losses = per_sample_losses(model, packed, [(0, slice(s, s + n)) for s, n in zip(starts, lengths)])
    assert packed_losses == pytest.approx(longest_losses, rel=1e-3, abs=1e-3)
