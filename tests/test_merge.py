import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLForConditionalGeneration

from answers import build_messages
from conftest import run_script, train_lora
from model_families import FAMILIES
from utils import ImageSettings, to_model_frame

QWEN2_5_VL = FAMILIES["qwen2_5_vl"]
QWEN3_VL = FAMILIES["qwen3_vl"]
ATTENTION = ("q_proj", "v_proj", "qkv")  # the language model's and the vision tower's


def make_adapter(base_dir, adapter_dir, max_image_side=224, family=QWEN2_5_VL, target_modules=ATTENTION):
    """A LoRA adapter with random B (on an embedding, random A: peft starts that one at zero) since a fresh
    adapter is a no-op, saved with image settings the way sft.py saves them."""
    model = AutoModelForImageTextToText.from_pretrained(base_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules)))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name or "lora_embedding_A" in name:
            parameter.data.normal_(0, 0.1)
    model.save_pretrained(adapter_dir)
    processor = AutoProcessor.from_pretrained(base_dir)
    ImageSettings.from_processor(processor, max_image_side, family).save(adapter_dir)
    return str(adapter_dir)


def model_inputs(processor, settings):
    image = Image.new("RGB", (300, 170), (240, 240, 240))
    image.paste((200, 30, 30), (40, 50, 120, 110))
    prompt = processor.apply_chat_template(build_messages("where is the red square?"), add_generation_prompt=True)
    return processor(text=[prompt], images=[to_model_frame(image, settings)], return_tensors="pt")


@torch.no_grad()
def test_merged_model_equals_base_plus_adapter(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    output_dir = tmp_path / "merged"
    merge = ["--base_model", tiny_model_dir, "--adapter", adapter, "--output_dir", output_dir]
    run_script("scripts/merge_model.py", *merge)

    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(output_dir)  # plain from_pretrained, no peft
    processor = AutoProcessor.from_pretrained(output_dir)
    settings = ImageSettings.load(output_dir)
    assert settings == ImageSettings.load(adapter)  # the training's image settings travel with the model
    inputs = model_inputs(processor, settings)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    base_logits = base(**inputs).logits
    adapted_logits = PeftModel.from_pretrained(base, adapter)(**inputs).logits
    merged_logits = merged(**inputs).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the model
    assert (merged_logits - adapted_logits).abs().max() < 1e-4
    assert sorted(os.listdir(tmp_path)) == ["adapter", "merged"]  # no temporary dir left behind


def test_merge_refuses_another_base_and_keeps_base_dtype(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    # The same weights under another name, stored in bfloat16 as Qwen2.5-VL ships.
    renamed_base = tmp_path / "renamed-model"
    AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(renamed_base)
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(renamed_base)
    output_dir = tmp_path / "merged"
    merge = ["scripts/merge_model.py", "--adapter", adapter, "--output_dir", output_dir]

    result = run_script(*merge, "--base_model", renamed_base, check=False)
    assert result.returncode != 0
    assert f"trained on {tiny_model_dir}, not on --base_model {renamed_base}" in result.stderr
    assert not output_dir.exists()

    run_script(*merge, "--base_model", renamed_base, "--force")
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(output_dir)
    assert merged.dtype == torch.bfloat16

    result = run_script(*merge, "--base_model", tiny_model_dir, check=False)  # OUT now holds a model
    assert result.returncode != 0 and "exists and is not empty" in result.stderr


def test_merge_refuses_adapter_that_does_not_fit(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    narrow_base = tmp_path / "narrow-model"
    run_script("scripts/make_tiny_model.py", "--output_dir", narrow_base, "--hidden_size", 64)
    output_dir = tmp_path / "merged"
    merge = ["--base_model", narrow_base, "--adapter", adapter, "--output_dir", output_dir, "--force"]
    result = run_script("scripts/merge_model.py", *merge, check=False)
    assert result.returncode != 0
    assert f"the adapter {adapter} does not fit --base_model {narrow_base}" in result.stderr
    assert "size mismatch" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["adapter", "narrow-model"]  # no OUT, no temporary dir


def test_merge_keeps_dtype_named_only_in_text_config(tiny_qwen3_vl_dir, tmp_path):
    # Qwen3-VL-4B-Instruct's config.json names its dtype only inside text_config: bfloat16 weights whose
    # top-level config.dtype reads None.
    base_dir = tmp_path / "qwen3-vl-bf16"
    AutoModelForImageTextToText.from_pretrained(tiny_qwen3_vl_dir, dtype=torch.bfloat16).save_pretrained(base_dir)
    AutoProcessor.from_pretrained(tiny_qwen3_vl_dir).save_pretrained(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    del config["dtype"]
    config["text_config"].update(dtype="bfloat16", torch_dtype="bfloat16")
    (base_dir / "config.json").write_text(json.dumps(config, indent=2))
    adapter = make_adapter(base_dir, tmp_path / "adapter", family=QWEN3_VL)

    output_dir = tmp_path / "merged"
    run_script("scripts/merge_model.py", "--base_model", base_dir, "--adapter", adapter, "--output_dir", output_dir)
    with safe_open(output_dir / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    assert AutoModelForImageTextToText.from_pretrained(output_dir).dtype == torch.bfloat16


@torch.no_grad()
def test_merge_of_sft_lora_on_tied_embeddings_stays_tied(tiny_tied_model_dir, data_dir, tmp_path):
    adapter = train_lora(tiny_tied_model_dir, data_dir / "first4.jsonl", tmp_path / "lora", max_steps=2)
    output_dir = tmp_path / "merged"
    merge = ["--base_model", tiny_tied_model_dir, "--adapter", adapter, "--output_dir", output_dir]
    run_script("scripts/merge_model.py", *merge)

    merged, loading = Qwen2_5_VLForConditionalGeneration.from_pretrained(output_dir, output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched weights
    embed_tokens = merged.model.language_model.embed_tokens.weight
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is embed_tokens
    base = AutoModelForImageTextToText.from_pretrained(tiny_tied_model_dir)
    assert torch.equal(embed_tokens, base.model.language_model.embed_tokens.weight)  # the adapter is on q/v_proj

    processor = AutoProcessor.from_pretrained(output_dir)
    inputs = model_inputs(processor, ImageSettings.load(output_dir))
    base_logits = base(**inputs).logits
    adapted_logits = PeftModel.from_pretrained(base, adapter)(**inputs).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the training really changed the model
    assert (merged(**inputs).logits - adapted_logits).abs().max() < 1e-4


@pytest.mark.parametrize("embedding", ["lm_head", "embed_tokens"])
@torch.no_grad()
def test_merge_unties_embeddings_that_the_adapter_changes(tiny_tied_model_dir, tmp_path, embedding):
    # Merged into the shared matrix, a LoRA on one of the tied embeddings would change the other too.
    adapter = make_adapter(tiny_tied_model_dir, tmp_path / "adapter", target_modules=["q_proj", embedding])
    output_dir = tmp_path / "merged"
    merge = ["--base_model", tiny_tied_model_dir, "--adapter", adapter, "--output_dir", output_dir]
    run_script("scripts/merge_model.py", *merge)

    merged, loading = Qwen2_5_VLForConditionalGeneration.from_pretrained(output_dir, output_loading_info=True)
    assert not any(loading.values()), loading
    assert not merged.config.tie_word_embeddings
    processor = AutoProcessor.from_pretrained(output_dir)
    inputs = model_inputs(processor, ImageSettings.load(output_dir))
    base = AutoModelForImageTextToText.from_pretrained(tiny_tied_model_dir)
    base_logits = base(**inputs).logits
    adapted_logits = PeftModel.from_pretrained(base, adapter)(**inputs).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-2
    assert (merged(**inputs).logits - adapted_logits).abs().max() < 1e-4
