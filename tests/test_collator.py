import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLForConditionalGeneration

from answers import read_answer_box
from conftest import rows_from_dataset, run_script
from model_families import FAMILIES, MODEL_FRAME_0_1000
from utils import IGNORE_INDEX, load_image
from vision_datacollator import GroundingCollator

QWEN2_5_VL = FAMILIES["qwen2_5_vl"]


def qwen2_5_vl_collator(processor, **kwargs):
    """The collator for the tiny Qwen2.5-VL, for the tests that need only one family."""
    return GroundingCollator(processor, family=QWEN2_5_VL, **kwargs)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def tiny(request, tiny_model_dir, tiny_qwen3_vl_dir):
    """(family, processor, model) of each tiny family, detected as sft.py detects it."""
    model_dir = {"qwen2_5_vl": tiny_model_dir, "qwen3_vl": tiny_qwen3_vl_dir}[request.param]
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    assert model.config.model_type == request.param
    return FAMILIES[request.param], AutoProcessor.from_pretrained(model_dir), model


def test_rows_cover_sizes_and_orientations(collator_rows):
    sizes = [Image.open(row["image"][0]).size for row in collator_rows]
    assert min(min(s) for s in sizes) < 400 and max(max(s) for s in sizes) > 900
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)


@pytest.mark.parametrize("max_side", [224, 448])
@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_position_ids_equal_transformers_get_rope_index(tiny, collator_rows, max_side, padding):
    family, processor, model = tiny
    collator = GroundingCollator(
        processor, max_seq_length=2048, max_img_side_length=max_side, padding=padding, family=family
    )
    for start in range(0, len(collator_rows), 4):
        batch = collator(collator_rows[start : start + 4])
        reference, _ = model.model.get_rope_index(
            batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], attention_mask=batch["attention_mask"]
        )
        real = batch["attention_mask"].bool()
        assert torch.equal(batch["position_ids"][:, real], reference[:, real])
        if padding == "max_length":
            assert batch["input_ids"].shape[1] == 2048


@pytest.mark.parametrize("max_side", [224, 448])
def test_packed_position_ids_restart_per_sample(tiny, collator_rows, max_side):
    family, processor, model = tiny
    rows = collator_rows[:5]
    settings = dict(max_seq_length=2048, max_img_side_length=max_side, family=family)
    batch = GroundingCollator(processor, padding="packed", **settings)(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    assert batch["position_ids"].shape == (4, 1, batch["input_ids"].shape[1])
    single = GroundingCollator(processor, padding="longest", **settings)
    offset = 0
    for row in rows:
        alone = single([row])
        length = alone["input_ids"].shape[1]
        reference, _ = model.model.get_rope_index(alone["input_ids"], alone["mm_token_type_ids"], alone["image_grid_thw"])
        packed_slice = batch["position_ids"][:, 0, offset : offset + length]
        assert torch.equal(packed_slice[1:], reference[:, 0])
        assert torch.equal(packed_slice[0], torch.arange(length))
        assert torch.equal(batch["input_ids"][0, offset : offset + length], alone["input_ids"][0])
        offset += length
    assert offset == batch["input_ids"].shape[1]  # no padding at all


@pytest.mark.parametrize("max_side", [224, 448, 1024])
def test_label_box_is_original_box_in_model_frame(tiny, collator_rows, max_side):
    """Qwen2.5-VL learns pixels of the frame the processor really fed the model (from image_grid_thw),
    Qwen3-VL round(x / frame width * 1000) of that frame."""
    family, processor, _ = tiny
    collator = GroundingCollator(processor, max_seq_length=8192, max_img_side_length=max_side, family=family)
    batch = collator(collator_rows)
    patch = processor.image_processor.patch_size
    for index, row in enumerate(collator_rows):
        labels = batch["labels"][index]
        answer_ids = labels[labels != IGNORE_INDEX]
        # Everything up to and including "<|im_start|>assistant\n" is masked; the answer and <|im_end|> are learned.
        assert processor.tokenizer.decode(answer_ids[-1:]) == "<|im_end|>"
        first_label = int((labels != IGNORE_INDEX).nonzero()[0])
        assert processor.tokenizer.decode(batch["input_ids"][index, :first_label]).endswith("<|im_start|>assistant\n")
        learned_box = read_answer_box(processor.tokenizer.decode(answer_ids[:-1]))
        _, grid_h, grid_w = batch["image_grid_thw"][index].tolist()
        original_size = Image.open(row["image"][0]).size
        x1, y1, x2, y2 = read_answer_box(row["assistant"])
        frame_w, frame_h = grid_w * patch, grid_h * patch
        scale_x, scale_y = frame_w / original_size[0], frame_h / original_size[1]
        expected = [x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y]
        if family.coordinate_system == MODEL_FRAME_0_1000:
            expected = [x * 1000 / size for x, size in zip(expected, (frame_w, frame_h, frame_w, frame_h))]
            assert all(float(v).is_integer() for v in learned_box)
            assert max(abs(a - b) for a, b in zip(learned_box, expected)) <= 0.5 + 1e-6
        else:
            assert max(abs(a - b) for a, b in zip(learned_box, expected)) <= 1.0


def per_sample_losses(model, batch, sample_slices):
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    losses = []
    for row, span in sample_slices:
        token_losses = F.cross_entropy(
            logits[row, span][:-1], batch["labels"][row, span][1:], ignore_index=IGNORE_INDEX, reduction="sum"
        )
        losses.append(float(token_losses))
    return losses


def test_packed_loss_equals_longest_loss_per_sample(tiny, collator_rows):
    family, processor, model = tiny
    rows = collator_rows[:4]
    longest = GroundingCollator(processor, max_img_side_length=224, padding="longest", family=family)(rows)
    packed = GroundingCollator(processor, max_img_side_length=224, padding="packed", family=family)(rows)
    lengths = longest["attention_mask"].sum(1).tolist()
    longest_losses = per_sample_losses(model, longest, [(i, slice(0, n)) for i, n in enumerate(lengths)])
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    packed_losses = per_sample_losses(model, packed, [(0, slice(s, s + n)) for s, n in zip(starts, lengths)])
    assert packed_losses == pytest.approx(longest_losses, rel=1e-4, abs=1e-4)
    # And the batch loss the Trainer sees is the same.
    with torch.no_grad():
        assert float(model(**packed).loss) == pytest.approx(float(model(**longest).loss), rel=1e-4)


def test_too_long_samples_are_dropped_and_counted_or_raise(processor, collator_rows, caplog):
    rows = collator_rows[:4]
    lengths = qwen2_5_vl_collator(processor, max_img_side_length=448)(rows)["attention_mask"].sum(1).tolist()
    limit = sorted(lengths)[1]  # the two shortest fit, the rest do not
    collator = qwen2_5_vl_collator(processor, max_seq_length=limit, max_img_side_length=448, padding="max_length")
    with caplog.at_level(logging.WARNING):
        batch = collator(rows)
    kept = sum(n <= limit for n in lengths)
    assert batch["input_ids"].shape == (kept, limit)
    assert collator.num_dropped == len(rows) - kept
    too_long_path = rows[lengths.index(max(lengths))]["image"][0]
    assert too_long_path in caplog.text
    # image tokens are never cut: every kept row holds all its image tokens
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    expected_tokens = batch["image_grid_thw"].prod(-1) // 4
    assert torch.equal((batch["input_ids"] == image_token_id).sum(1), expected_tokens)

    raising = qwen2_5_vl_collator(processor, max_seq_length=limit, max_img_side_length=448, too_long="raise")
    with pytest.raises(ValueError, match="max_seq_length"):
        raising(rows)
    with pytest.raises(ValueError, match="every sample"):
        qwen2_5_vl_collator(processor, max_seq_length=10, max_img_side_length=448)(rows)


def test_bad_inputs_give_clear_errors(processor, collator_rows, tmp_path):
    collator = qwen2_5_vl_collator(processor, max_img_side_length=224)
    good = collator_rows[0]
    missing = str(tmp_path / "missing.jpg")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        collator([{**good, "image": [missing]}])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        collator([{**good, "image": [str(corrupt)]}])
    for answer in ['{"bbox_2d": [1, 2, 3, 4]', '{"box": [1, 2, 3, 4]}', '[{"bbox_2d": [1, 2, 3]}]', '{"bbox_2d": [1, 2, 3]}', '{"bbox_2d": [1, 2, NaN, 4]}', '{"bbox_2d": [1, "2", 3, 4]}']:
        with pytest.raises(ValueError, match=good["image"][0]):
            collator([{**good, "assistant": answer}])
    with pytest.raises(ValueError, match="padding"):
        qwen2_5_vl_collator(processor, padding="right")


def test_processor_resizing_again_is_an_error(processor, collator_rows):
    """Image settings whose min_pixels is below the processor's: a 28 px frame that the processor
    would enlarge again, so the box would sit in the wrong frame. Training must refuse it."""
    collator = qwen2_5_vl_collator(processor, max_img_side_length=28)
    assert processor.image_processor.size["shortest_edge"] > 28 * 28
    collator.image_settings = dataclasses.replace(collator.image_settings, min_pixels=28 * 28)
    with pytest.raises(ValueError, match="the processor resized .* again"):
        collator(collator_rows[:1])


def test_image_modes_are_converted(processor, collator_rows, tmp_path):
    collator = qwen2_5_vl_collator(processor, max_img_side_length=224)
    row = collator_rows[0]
    rgb = Image.open(row["image"][0])
    reference = collator([row])
    for mode, suffix in [("L", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg")]:
        path = str(tmp_path / f"image_{mode}.{suffix}")
        rgb.convert(mode).save(path)
        batch = collator([{**row, "image": [path]}])
        assert torch.equal(batch["image_grid_thw"], reference["image_grid_thw"])
        assert torch.equal(batch["labels"], reference["labels"])
        assert torch.isfinite(batch["pixel_values"]).all()


def image_from_pixel_values(processor, pixel_values, grid_thw) -> Image.Image:
    """Undo the processor's patchify + normalisation: the exact picture the vision tower receives."""
    image_processor = processor.image_processor
    patch, merge, temporal = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    _, grid_h, grid_w = grid_thw.tolist()
    patches = pixel_values.view(grid_h // merge, grid_w // merge, merge, merge, 3, temporal, patch, patch)[:, :, :, :, :, 0]
    pixels = patches.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, grid_h * patch, grid_w * patch)
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    pixels = ((pixels * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def test_target_box_sits_on_object_edges(processor, tmp_path):
    """On what the model sees (rebuilt from pixel_values), the target box edges are the square's edges."""
    dataset_dir = tmp_path / "squares"
    run_script(
        "scripts/make_synthetic_data.py", "--output_dir", dataset_dir, "--num_samples", 6, "--seed", 7,
        "--shapes", "square", "--max_distractors", "0", "--min_object", "0.3",
    )  # fmt: skip
    rows = rows_from_dataset(dataset_dir, tmp_path / "images")
    collator = qwen2_5_vl_collator(processor, max_img_side_length=336)
    batch = collator(rows)
    offset = 0
    for index, row in enumerate(rows):
        grid = batch["image_grid_thw"][index]
        num_patches = int(grid.prod())
        seen = image_from_pixel_values(processor, batch["pixel_values"][offset : offset + num_patches], grid)
        offset += num_patches
        labels = batch["labels"][index]
        x1, y1, x2, y2 = json.loads(processor.tokenizer.decode(labels[labels != IGNORE_INDEX][:-1]))["bbox_2d"]

        original = load_image(row["image"][0])
        ox, oy = read_answer_box(row["assistant"])[:2]
        object_color = original.getpixel((int(ox) + 3, int(oy) + 3))
        corner = (0, 0) if (ox, oy) != (0, 0) else (original.size[0] - 1, original.size[1] - 1)
        background = original.getpixel(corner)

        def close(pixel, color):
            return max(abs(a - b) for a, b in zip(pixel, color)) <= 40

        middle_x, middle_y = (x1 + x2) // 2, (y1 + y2) // 2
        inside = [(x1 + 2, middle_y), (x2 - 3, middle_y), (middle_x, y1 + 2), (middle_x, y2 - 3)]
        outside = [(x1 - 3, middle_y), (x2 + 2, middle_y), (middle_x, y1 - 3), (middle_x, y2 + 2)]
        for point in inside:
            assert close(seen.getpixel(point), object_color), (index, point, "inside the box should be the square")
        for point in outside:
            if 0 <= point[0] < seen.size[0] and 0 <= point[1] < seen.size[1]:
                assert close(seen.getpixel(point), background), (index, point, "outside the box should be background")


def test_defaults_keep_a_textvqa_sized_sample_and_the_tutorial_name_still_works(processor, tmp_path):
    """One default for the longer side (utils.DEFAULT_MAX_IMAGE_SIDE, 256): a 640x480 photo becomes a
    252x196 frame and fits the default max_seq_length instead of being dropped."""
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (640, 480), (90, 120, 200)).save(path)
    row = {"image": [str(path)], "user": "where is the sign?", "assistant": '{"bbox_2d": [64, 48, 320, 240]}'}
    collator = qwen2_5_vl_collator(processor)
    batch = collator([row])
    assert collator.num_dropped == 0
    assert batch["image_grid_thw"].tolist() == [[1, 196 // 14, 252 // 14]]
    labels = batch["labels"][0]
    assert json.loads(processor.tokenizer.decode(labels[labels != IGNORE_INDEX][:-1])) == {"bbox_2d": [25, 20, 126, 98]}
    tutorial = qwen2_5_vl_collator(processor, max_img_side_length=448)
    assert tutorial.image_settings == qwen2_5_vl_collator(processor, max_image_side=448).image_settings
    assert tutorial.image_settings.max_image_side == 448
    with pytest.raises(ValueError, match="give one"):
        qwen2_5_vl_collator(processor, max_image_side=336, max_img_side_length=448)


def test_tutorial_construction_lines_build_the_family_collator(tiny, collator_rows, tmp_path):
    """The tutorial's sft.py imports Qwen2_5VLCollator, or looks its YAML name up in the map, and passes
    processor, max_seq_length and max_img_side_length only: the family comes from the processor, whether it
    was loaded from the model folder (config.json beside it) or from a folder holding only processor files."""
    from vision_datacollator import Qwen2_5VLCollator, vision_data_collator_map

    family, processor, _ = tiny
    processor.save_pretrained(tmp_path)
    processor_alone = AutoProcessor.from_pretrained(tmp_path)
    rows = collator_rows[:4]
    expected = GroundingCollator(processor, max_seq_length=2048, max_image_side=448, family=family)(rows)
    for tutorial_processor in (processor, processor_alone):
        data_collator = Qwen2_5VLCollator(processor=tutorial_processor, max_seq_length=2048, max_img_side_length=448)
        from_map = vision_data_collator_map["Qwen2_5VLCollator"](
            processor=tutorial_processor, max_seq_length=2048, max_img_side_length=448
        )
        for collator in (data_collator, from_map):
            assert collator.image_settings.coordinate_system == family.coordinate_system
            batch = collator(rows)
            assert batch.keys() == expected.keys()
            assert all(torch.equal(batch[key], expected[key]) for key in expected if key != "use_cache")


@pytest.mark.parametrize("box", [[2000, 10, 2001, 60], [3999, 10, 4000, 60], [0, 50, 400, 50.04]])
def test_box_that_rounds_to_zero_size_is_learned_one_unit_wide(tiny, tmp_path, box):
    """A 1 px box of a 4000 px wide image is a fraction of a unit in the model frame (and in 0-1000): it must
    not become an empty box, also at the image's edge."""
    family, processor, _ = tiny
    image_path = str(tmp_path / "wide.png")
    Image.new("RGB", (4000, 100), "white").save(image_path)
    row = {"image": [image_path], "user": "where is the line?", "assistant": json.dumps({"bbox_2d": box})}
    batch = GroundingCollator(processor, max_img_side_length=224, family=family)([row])
    labels = batch["labels"][0]
    x1, y1, x2, y2 = read_answer_box(processor.tokenizer.decode(labels[labels != IGNORE_INDEX][:-1]))
    _, grid_h, grid_w = batch["image_grid_thw"][0].tolist()
    patch = processor.image_processor.patch_size
    frame = (1000, 1000) if family.coordinate_system == MODEL_FRAME_0_1000 else (grid_w * patch, grid_h * patch)
    assert 0 <= x1 < x2 <= frame[0] and 0 <= y1 < y2 <= frame[1]
    assert min(x2 - x1, y2 - y1) == 1


@pytest.mark.parametrize("max_side", [224, 448])
def test_token_count_from_image_header_equals_encoded_length(tiny, collator_rows, max_side):
    """sft.py drops over-long samples before training by token_count, which never decodes an image."""
    family, processor, _ = tiny
    collator = GroundingCollator(processor, max_seq_length=8192, max_img_side_length=max_side, family=family)
    for row in collator_rows:
        assert collator.token_count(row) == len(collator.encode(row)["input_ids"])


@pytest.mark.parametrize("padding", ["longest", "max_length", "packed"])
def test_list_empty_and_text_answers_train_beside_single_boxes(tiny, collator_rows, padding):
    """One batch mixing the three answer kinds over images of different sizes: each box of a list is learned
    exactly as the same box alone would be, "[]" is learned as "[]", a text answer as written; only
    single-box prompts carry the tutorial's box instruction."""
    family, processor, _ = tiny
    collator = GroundingCollator(processor, max_seq_length=4096, padding=padding, family=family)
    box_rows = collator_rows[:3]
    image = box_rows[1]["image"]
    first_box, second_box = read_answer_box(box_rows[1]["assistant"]), read_answer_box(box_rows[0]["assistant"])
    objects = [{"bbox_2d": first_box, "label": "sign"}, {"bbox_2d": second_box, "label": "text"}]
    rows = box_rows + [
        {"image": image, "user": 'Locate every instance of "sign".', "assistant": json.dumps(objects)},
        {"image": image, "user": 'Locate every instance of "cat".', "assistant": "[]"},
        {"image": image, "user": "What colour is the sign?", "assistant": "dark red"},
    ]
    alone = [{"image": image, "user": "q", "assistant": json.dumps({"bbox_2d": box})} for box in (first_box, second_box)]

    def answers_and_prompts(batch, count):
        labels = batch["labels"].reshape(count if padding != "packed" else 1, -1)
        flat_ids, flat_labels = batch["input_ids"].flatten(), labels.flatten()
        learned = flat_labels != IGNORE_INDEX
        # Runs of learned tokens, one per sample, each ending in <|im_end|>.
        ends = (flat_labels == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")).nonzero().flatten().tolist()
        starts = [int(learned[:end].logical_not().nonzero().max()) + 1 for end in ends]
        answers = [processor.tokenizer.decode(flat_ids[s:e]) for s, e in zip(starts, ends)]
        return answers, processor.tokenizer.decode(flat_ids)

    answers, text = answers_and_prompts(collator(rows), len(rows))
    single_answers, _ = answers_and_prompts(collator(alone), len(alone))
    assert json.loads(answers[3]) == [
        {"bbox_2d": json.loads(single_answers[0])["bbox_2d"], "label": "sign"},
        {"bbox_2d": json.loads(single_answers[1])["bbox_2d"], "label": "text"},
    ]
    assert answers[4] == "[]" and answers[5] == "dark red"
    assert [json.loads(answer)["bbox_2d"] for answer in answers[:3]] == [
        json.loads(answer)["bbox_2d"] for answer in answers_and_prompts(collator(box_rows), 3)[0]
    ]
    assert text.count("coordinate boxes") == 3
