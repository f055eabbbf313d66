"""Measure collation, training and inference speed side by side, in one process, and print tables.

    python scripts/benchmark.py                      # CPU, tiny model built on the fly
    python scripts/benchmark.py --device cuda --arch 3b --attn sdpa flash_attention_2

Every figure in a table comes from the same run on the same batches, so ratios are fair on a
noisy machine. Modes are interleaved round by round instead of run one after another.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm
from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
from infer import predict  # noqa: E402
from utils import ImageSettings  # noqa: E402
from vision_datacollator import PADDING_MODES, Qwen2_5VLCollator  # noqa: E402

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
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks


def run(*args):
    subprocess.run([sys.executable, *map(str, args)], cwd=REPO_DIR, check=True, capture_output=True)


def build_inputs(args, workdir):
    """The tiny model (unless --model) and TextVQA-sized synthetic samples (sides 480-1024 px)."""
    model_dir = args.model or os.path.join(workdir, "tiny")
    if not args.model:
        run("scripts/make_tiny_model.py", "--output_dir", model_dir)
    data_dir = os.path.join(workdir, "data")
    run("scripts/make_synthetic_data.py", "--output_dir", data_dir, "--num_samples", args.num_samples,
        "--min_side", 480, "--max_side", 1024, "--seed", args.seed)  # fmt: skip
    run("scripts/convert2sft_format.py", "--data_path", data_dir, "--save_path", os.path.join(workdir, "sft"),
        "--type", "train", "--train_range", f"0:{args.num_samples}")  # fmt: skip
    from utils import load_sft_jsonl

    return model_dir, load_sft_jsonl(os.path.join(workdir, "sft", "train.jsonl"))


def load_model(args, model_dir, processor, attn_implementation):
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.arch == "3b":
        tokenizer = processor.tokenizer
        config = Qwen2_5_VLConfig(
            **ARCH_3B,
            image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        )
        config._attn_implementation = attn_implementation
        with torch.device(args.device):
            model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)  # random init: speed, not quality
    else:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attn_implementation
        ).to(args.device)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    return model


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def real_tokens(batch) -> int:
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def bench_collator(processor, rows, args):
    print(f"\n## Collator (batch {args.batch_size}, max_image_side {args.max_image_side}, max_seq_length {args.max_seq_length})")
    print("| padding | real tokens / computed tokens | ms per sample |")
    print("|---|---|---|")
    batches = {}
    for padding in PADDING_MODES:
        collator = Qwen2_5VLCollator(processor, args.max_seq_length, args.max_image_side, padding=padding)
        start = time.perf_counter()
        batches[padding] = [collator(rows[i : i + args.batch_size]) for i in range(0, len(rows), args.batch_size)]
        per_sample_ms = (time.perf_counter() - start) / len(rows) * 1000
        real = sum(real_tokens(b) for b in batches[padding])
        computed = sum(b["input_ids"].numel() for b in batches[padding])
        print(f"| {padding} | {real / computed:.1%} | {per_sample_ms:.1f} |")
        if collator.num_dropped:
            print(f"  ({collator.num_dropped} samples dropped as too long)")
    return batches


def bench_training(model, batches, args, attn_implementation, num_parameters):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def step(batch):
        batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch

    seconds = {padding: 0.0 for padding in batches}
    tokens = {padding: 0 for padding in batches}
    for padding in batches:  # warm-up: allocator, kernels, lazy init
        step(batches[padding][0])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in tqdm(range(args.rounds), desc="training rounds"):
        for padding, padding_batches in batches.items():  # interleaved, so drift hits all modes alike
            for batch in padding_batches:
                synchronize(args.device)
                start = time.perf_counter()
                step(batch)
                synchronize(args.device)
                seconds[padding] += time.perf_counter() - start
                tokens[padding] += real_tokens(batch)
    num_samples = sum(len(b["image_grid_thw"]) for b in batches["longest"]) * args.rounds
    baseline = num_samples / seconds["max_length"]
    label = f"{args.arch}{' LoRA' if args.lora else ' full'}, {attn_implementation}, {args.device}"
    print(f"\n## Training step: forward + backward + AdamW ({label})")
    print("| padding | samples/s | vs max_length | ms per step |" + (" MFU |" if args.device == "cuda" else ""))
    print("|---|---|---|---|" + ("---|" if args.device == "cuda" else ""))
    for padding in batches:
        rate = num_samples / seconds[padding]
        step_ms = seconds[padding] / (len(batches[padding]) * args.rounds) * 1000
        row = f"| {padding} | {rate:.2f} | {rate / baseline:.2f}x | {step_ms:.0f} |"
        if args.device == "cuda":
            peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
            # 6 * params * real tokens: the useful forward + backward FLOPs (vision patches not counted).
            mfu = 6 * num_parameters * tokens[padding] / seconds[padding] / peak if peak else float("nan")
            row += f" {mfu:.1%} |"
        print(row)
    if args.device == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB on {torch.cuda.get_device_name()}")


def bench_inference(model, processor, rows, args):
    model.eval()
    settings = ImageSettings.from_processor(processor, args.max_image_side)
    sample = rows[: args.inference_samples]
    results = {}
    for batch_size in (1, 16):
        predict(model, processor, sample[:batch_size], settings, batch_size, args.new_tokens, show_progress=False)
    for batch_size in (1, 16):
        synchronize(args.device)
        start = time.perf_counter()
        predict(model, processor, sample, settings, batch_size, args.new_tokens, show_progress=False)
        synchronize(args.device)
        results[batch_size] = len(sample) / (time.perf_counter() - start)
    print(f"\n## Inference: infer.predict, greedy, {args.new_tokens} new tokens max, {len(sample)} samples")
    print("| batch size | samples/s | vs batch 1 |")
    print("|---|---|---|")
    for batch_size, rate in results.items():
        print(f"| {batch_size} | {rate:.2f} | {rate / results[1]:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", help="model dir (default: build the tiny model); its processor is used")
    parser.add_argument("--arch", default="model", choices=["model", "3b"], help="3b: random-init Qwen2.5-VL-3B sizes")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--attn", nargs="+", default=["sdpa"], help="attention implementations to compare")
    parser.add_argument("--num_samples", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_image_side", type=int, default=256, help="the tutorial's value")
    parser.add_argument("--max_seq_length", type=int, default=256, help="the tutorial's value")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inference_samples", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["training", "inference"])
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as workdir:
        model_dir, rows = build_inputs(args, workdir)
        processor = AutoProcessor.from_pretrained(model_dir)
        print(f"# Benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
        print(f"command: python scripts/benchmark.py {' '.join(sys.argv[1:])}")
        batches = bench_collator(processor, rows, args)
        for attn_implementation in args.attn:
            model = load_model(args, model_dir, processor, attn_implementation)
            num_parameters = sum(p.numel() for p in model.parameters())
            if "training" not in args.skip:
                bench_training(model, batches, args, attn_implementation, num_parameters)
            if "inference" not in args.skip and not args.lora:
                bench_inference(model, processor, rows, args)
            del model


if __name__ == "__main__":
    main()
