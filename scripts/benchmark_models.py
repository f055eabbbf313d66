"""The models scripts/benchmark.py measures: the tiny model (or any --model dir) as saved, or Qwen2.5-VL-3B's
architecture at random init (speed, not quality), with its Liger, gradient checkpointing and LoRA switches;
and the parameter counts and FLOPs its tables are estimated from."""

import torch
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

# Qwen2.5-VL-3B-Instruct's architecture (sizes only; token ids come from the processor in use).
ARCH_3B = dict(
    text_config=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
        fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2,
    ),
    tie_word_embeddings=True,
)  # fmt: skip


def parameter_split(model) -> tuple[int, int]:
    """(language model + lm_head, vision tower) parameter counts; tied embeddings count once."""
    vision = sum(p.numel() for p in model.model.visual.parameters())
    return sum(p.numel() for p in model.parameters()) - vision, vision


def training_flops(text_parameters, vision_parameters, tokens, patches) -> float:
    """Forward + backward matmul FLOPs: 6 per parameter per token (text) or patch (vision) it sees;
    attention scores are left out (sequences here are short)."""
    return 6 * (text_parameters * tokens + vision_parameters * patches)


def config_3b(processor) -> Qwen2_5_VLConfig:
    tokenizer = processor.tokenizer
    return Qwen2_5_VLConfig(
        **ARCH_3B,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )


def parameter_split_3b(processor) -> tuple[int, int]:
    with torch.device("meta"):  # sizes only, no memory
        return parameter_split(Qwen2_5_VLForConditionalGeneration(config_3b(processor)))


def load_model(args, model_dir, processor, attn_implementation, liger):
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.arch == "3b":
        config = config_3b(processor)
        config._attn_implementation = attn_implementation
        with torch.device(args.device):
            model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)  # random init: speed, not quality
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attn_implementation
        ).to(args.device)
    if liger:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, None)  # what Trainer does for use_liger_kernel: true
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora:  # configs/SFT_Qwen2_5-VL-3B-Instruct_vqa_lora.yaml's adapters
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = get_peft_model(model, lora)
    return model
