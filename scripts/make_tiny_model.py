"""Build a tiny, randomly initialised Qwen2.5-VL, Qwen3-VL or Qwen3.5 offline: tokenizer, processor and model.

It is the family's real model class (`Qwen2_5_VLForConditionalGeneration`,
`Qwen3VLForConditionalGeneration`, `Qwen3_5ForConditionalGeneration`) and processor class with few
layers, saved so that `AutoProcessor.from_pretrained(DIR)` and
`AutoModelForImageTextToText.from_pretrained(DIR)` load it exactly as they load
Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen3-VL-4B-Instruct or Qwen/Qwen3.5-0.8B. Tests and the CPU demo train it.

    python scripts/make_tiny_model.py --output_dir models/tiny-qwen2.5-vl
    python scripts/make_tiny_model.py --family qwen3_vl --output_dir models/tiny-qwen3-vl
    python scripts/make_tiny_model.py --family qwen3_5 --output_dir models/tiny-qwen3.5
"""

import argparse
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2TokenizerFast,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from answers import PROMPT_SUFFIX  # noqa: E402

# Qwen2.5-VL's special tokens, in the real model's order (ids differ here: never hard-code them).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

# Qwen3-VL's tokenizer adds Qwen3's tool, fill-in-the-middle and thinking tokens after those, as
# ordinary (special: false) tokens (tokenizer_config.json of Qwen/Qwen3-VL-*-Instruct).
QWEN3_EXTRA_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]  # fmt: skip
# Qwen3-VL-Instruct's chat_template.json, unchanged: no default system prompt, unlike Qwen2.5-VL's.
TEMPLATES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
QWEN3_VL_CHAT_TEMPLATE_FILE = os.path.join(TEMPLATES_DIR, "qwen3_vl_chat_template.jinja")
# Qwen3.5's chat_template.jinja (Qwen/Qwen3.5-*, one template for the family), unchanged; its public copy is
# named in docs/families.md. It thinks by default: utils.render_prompt turns thinking off.
QWEN3_5_CHAT_TEMPLATE_FILE = os.path.join(TEMPLATES_DIR, "qwen3_5_chat_template.jinja")

# Qwen2.5-VL-Instruct's chat template (default system prompt, image/video placeholders).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the BPE merges are learned from: the chat frame, the prompt and the answer format.
# Byte-level BPE still encodes any other text (a real TextVQA question), byte by byte.
TOKENIZER_CORPUS = [
    "system\nYou are a helpful assistant.\nuser\nassistant\n",
    PROMPT_SUFFIX,
    '{"bbox_2d": [12, 345, 678, 901]}',
    "where is the red square? where is the blue circle? where is the green triangle? "
    "what is written on the sign? what is the name of the company on the card?",
    "red green blue yellow orange purple cyan magenta white black gray brown pink "
    "square circle triangle diamond cross star ring bar rectangle ellipse",
]


def build_tokenizer(vocab_size: int, chat_template: str, extra_tokens=()) -> Qwen2TokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    # Digits as single tokens: every coordinate is spelled digit by digit, which is easy to learn.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_CORPUS * 20, trainer=trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
        chat_template=chat_template,
    )
    tokenizer.add_tokens(list(extra_tokens))
    return tokenizer


def mrope_section(head_dim: int, interleaved: bool) -> list[int]:
    """Split head_dim / 2 rotary frequencies over (time, height, width). Qwen2.5-VL's blocks follow the
    3B's [16, 24, 24]; Qwen3-VL interleaves them (t h w t h w ...), so height and width get at most a third."""
    half = head_dim // 2
    height_width = (half - 1) // 3 if interleaved else half * 3 // 8
    return [half - 2 * height_width, height_width, height_width]


def text_config(args, tokenizer, interleaved: bool) -> dict:
    head_dim = args.hidden_size // args.num_heads
    section = mrope_section(head_dim, interleaved)
    rope = {"rope_type": "default", "rope_theta": args.rope_theta, "mrope_section": section}
    if interleaved:
        rope["mrope_interleaved"] = True
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 4,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=max(1, args.num_heads // 2),
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters=rope,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )


def vision_sizes(args) -> dict:
    return dict(
        depth=args.vision_depth,
        hidden_size=args.vision_hidden_size,
        intermediate_size=args.vision_hidden_size * 2,
        num_heads=args.vision_heads,
        out_hidden_size=args.hidden_size,
    )


def vision_token_ids(tokenizer) -> dict:
    """The config's vision token ids, read from the tokenizer (they differ from the real model's)."""
    return dict(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )


def build_qwen2_5_vl(args):
    tokenizer = build_tokenizer(args.vocab_size, CHAT_TEMPLATE)
    factor = 14 * 2  # Qwen2.5-VL's patch_size * merge_size, the processor's defaults
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            min_pixels=args.min_pixels or factor * factor * 4, max_pixels=args.max_pixels or factor * factor * 1280
        ),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config(args, tokenizer, interleaved=False),
        vision_config=dict(**vision_sizes(args), fullatt_block_indexes=[args.vision_depth - 1]),
        tie_word_embeddings=args.tie_word_embeddings,
        **vision_token_ids(tokenizer),
    )
    return Qwen2_5_VLForConditionalGeneration(config), processor


def qwen3_vl_processor(args, chat_template_file):
    """Qwen3-VL's processor, which Qwen3.5 uses too (transformers' processor mapping), and its patch and merge sizes."""
    with open(chat_template_file) as f:
        chat_template = f.read()
    tokenizer = build_tokenizer(args.vocab_size, chat_template, QWEN3_EXTRA_TOKENS)
    patch_size, merge_size = 16, 2  # Qwen3-VL's and Qwen3.5's preprocessor_config.json
    factor = patch_size * merge_size
    # Qwen3-VL's own min_pixels (65536) would enlarge the demo's 112 px images to 256 px: 4x the tokens.
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_pixels=args.min_pixels or factor * factor * 4,
        max_pixels=args.max_pixels or factor * factor * 1280,
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        video_processor=Qwen3VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
    vision = dict(
        **vision_sizes(args),
        patch_size=patch_size,
        spatial_merge_size=merge_size,
        temporal_patch_size=2,
        num_position_embeddings=16 * 16,  # a learned 16 x 16 grid, interpolated to each image's
    )
    return processor, vision


def build_qwen3_vl(args):
    processor, vision = qwen3_vl_processor(args, QWEN3_VL_CHAT_TEMPLATE_FILE)
    config = Qwen3VLConfig(
        text_config=text_config(args, processor.tokenizer, interleaved=True),
        vision_config=dict(**vision, deepstack_visual_indexes=[0]),
        tie_word_embeddings=args.tie_word_embeddings,
        **vision_token_ids(processor.tokenizer),
    )
    return Qwen3VLForConditionalGeneration(config), processor


def build_qwen3_5(args):
    processor, vision = qwen3_vl_processor(args, QWEN3_5_CHAT_TEMPLATE_FILE)
    text = text_config(args, processor.tokenizer, interleaved=True)
    # The real models rotate a quarter of each head (partial_rotary_factor 0.25 of 256); a tiny head of 16
    # would keep 2 frequencies for 3 mRoPE axes, so the tiny one rotates all of it.
    text["rope_parameters"]["partial_rotary_factor"] = 1.0
    config = Qwen3_5Config(
        text_config=dict(
            **text,
            # Qwen3.5's layout: three Gated DeltaNet (linear attention) layers, then one full attention layer.
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"]
            * max(1, args.num_layers // 4),
            linear_num_key_heads=max(1, args.num_heads // 2),
            linear_num_value_heads=args.num_heads,
            linear_key_head_dim=args.hidden_size // args.num_heads,
            linear_value_head_dim=args.hidden_size // args.num_heads,
            linear_conv_kernel_dim=4,
        ),
        vision_config=vision,
        tie_word_embeddings=args.tie_word_embeddings,
        **vision_token_ids(processor.tokenizer),
    )
    return Qwen3_5ForConditionalGeneration(config), processor


BUILDERS = {"qwen2_5_vl": build_qwen2_5_vl, "qwen3_vl": build_qwen3_vl, "qwen3_5": build_qwen3_5}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--family", default="qwen2_5_vl", choices=sorted(BUILDERS), help="the model_type to build")
    parser.add_argument("--seed", type=int, default=0)
    # Big enough for every word of the chat frame and prompt to become one token (the corpus saturates
    # at ~470): shorter sequences, cheaper steps. Digits stay single tokens whatever the size.
    parser.add_argument("--vocab_size", type=int, default=1000)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=4)
    # RoPE carries position only through attention weights: 8 heads of 16 are 8 position probes (issue #12).
    parser.add_argument("--num_heads", type=int, default=8)
    parser.add_argument("--vision_hidden_size", type=int, default=64)
    parser.add_argument("--vision_depth", type=int, default=2)
    parser.add_argument("--vision_heads", type=int, default=4)
    # The 3B's 1e6 suits thousands of positions; the tiny model's images are a few tokens across, and
    # mRoPE gives the width axis the slowest frequencies: at 1e4 neighbouring columns look alike, and
    # 3 (rather than 10) spreads 8 columns over more of a turn (docs/demo.md, third search; issue #12).
    parser.add_argument("--rope_theta", type=float, default=3.0)
    parser.add_argument("--min_pixels", type=int, help="default: 4 tokens (patch_size * merge_size squared, x 4)")
    parser.add_argument("--max_pixels", type=int, help="default: 1280 tokens")
    # The real 3B and Qwen3-VL-4B share one matrix between embed_tokens and lm_head; transformers 5 reads
    # the switch from the top-level config only.
    parser.add_argument("--tie_word_embeddings", action="store_true", help="lm_head shares embed_tokens' weight")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    model, processor = BUILDERS[args.family](args)
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id

    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    num_parameters = sum(p.numel() for p in model.parameters())
    vocab = len(processor.tokenizer)
    print(f"tiny {args.family} ({num_parameters / 1e6:.2f}M parameters, vocab {vocab}) saved to {args.output_dir}")


if __name__ == "__main__":
    main()
