"""Measure data loading, training and inference speed side by side, in one process, and print tables.

    python scripts/benchmark.py                      # CPU, tiny model built on the fly
    python scripts/benchmark.py --device cuda --arch 3b --attn sdpa flash_attention_2
    python scripts/benchmark.py --device cuda --arch 3b --layouts max_length:1 packed:16 --liger
    python scripts/benchmark.py --device cuda --arch 3b --parity_steps 3 --skip loading encode training inference

Every figure in a table comes from the same run on the same batches, so ratios are fair on a
noisy machine. Modes are interleaved round by round instead of run one after another.
--parity_steps N compares the losses of the first N training steps between padding layouts and
with/without Liger, from the same initial weights on the same batches.
"""

import argparse
import contextlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm
from transformers import AutoProcessor
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

# Read before anything applies Liger, which assigns this name whether transformers still calls it or not.
QWEN2_5_VL_HAS_MROPE_FUNCTION = hasattr(modeling_qwen2_5_vl, "apply_multimodal_rotary_pos_emb")

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
from answers import render_prompt  # noqa: E402
from benchmark_models import load_model, parameter_split, parameter_split_3b, training_flops  # noqa: E402
from model_families import detect_family  # noqa: E402
from generation import predict  # noqa: E402
from utils import DEFAULT_MAX_IMAGE_SIDE, ImageSettings, load_image, to_model_frame  # noqa: E402
from vision_datacollator import PADDING_MODES, GroundingCollator  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks
PARITY_LR = 1e-4  # big enough to move bf16 weights, so later steps' losses compare the gradients too
ASSUMED_MFU = 0.4  # what a well-fed 3B fine-tuning run reaches on an H100: an assumption, not a measurement
LIBRARIES = ("torch", "transformers", "accelerate", "peft", "deepspeed", "liger-kernel", "flash-attn")


def library_versions() -> str:
    versions = []
    for name in LIBRARIES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    return ", ".join(versions)


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


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(model, optimizer, batch, device) -> torch.Tensor:
    """Forward, backward and AdamW step; returns the loss."""
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def adamw(model, lr):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def real_tokens(batch) -> int:
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


@contextlib.contextmanager
def one_thread():
    """Collator timings run as in a DataLoader worker, which PyTorch limits to one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def parse_layout(text: str, default_batch_size: int) -> tuple[str, int]:
    """"packed:16" -> ("packed", 16); "packed" -> ("packed", --batch_size)."""
    padding, _, batch_size = text.partition(":")
    if padding not in PADDING_MODES:
        raise SystemExit(f"--layouts: {text!r}: padding must be one of {PADDING_MODES}")
    return padding, int(batch_size or default_batch_size)


def bench_loading(processor, rows, args, family, text_parameters, vision_parameters):
    """Can dataloader workers feed the GPU? One process's collator rate against the 3B model's appetite."""
    print(f"\n## Data loading: collator in one process (= one dataloader worker), {len(rows)} TextVQA-sized JPEGs")
    print(
        f"3B consumption: samples/s that full fine-tuning of Qwen2.5-VL-3B would take on one H100 at "
        f"{ASSUMED_MFU:.0%} MFU, estimated from FLOPs ({text_parameters / 1e9:.2f}B language + "
        f"{vision_parameters / 1e9:.2f}B vision parameters), not measured."
    )
    print("| max_image_side | tokens / sample | image patches / sample | collator samples/s per worker | 3B consumption samples/s (estimate) | workers for 2x |")
    print("|---|---|---|---|---|---|")
    for side in args.loading_sides:
        collator = GroundingCollator(processor, max_seq_length=1_000_000, max_image_side=side, family=family)
        with one_thread():
            collator.encode(rows[0])  # warm-up
            start = time.perf_counter()
            samples = [collator.encode(row) for row in rows]
            rate = len(rows) / (time.perf_counter() - start)
        tokens = sum(len(s["input_ids"]) for s in samples) / len(samples)
        patches = sum(len(s["pixel_values"]) for s in samples) / len(samples)
        flops = training_flops(text_parameters, vision_parameters, tokens, patches)
        consumption = ASSUMED_MFU * PEAK_BF16_FLOPS["H100"] / flops
        workers = math.ceil(2 * consumption / rate)
        print(f"| {side} | {tokens:.1f} | {patches:.1f} | {rate:.1f} | {consumption:.0f} | {workers} |")


def bench_encode_stages(processor, rows, args, family):
    """Where encode's time goes, each stage timed on the same rows in the same run."""
    settings = ImageSettings.from_processor(processor, args.max_image_side, family)
    images = [load_image(row["image"][0]) for row in rows]
    framed = [to_model_frame(image, settings) for image in images]
    prompts = [render_prompt(processor, row["user"]) for row in rows]
    stages = {
        "load_image (JPEG decode, RGB)": lambda i: load_image(rows[i]["image"][0]),
        "to_model_frame (PIL bicubic resize)": lambda i: to_model_frame(images[i], settings),
        "chat template": lambda i: render_prompt(processor, rows[i]["user"]),
        "processor (tokens + pixel values)": lambda i: processor(text=[prompts[i]], images=[framed[i]], return_tensors="pt"),
        # The frame is already a multiple of 28 px: the processor's own resize keeps it (same pixels).
        "processor, its no-op resize skipped": lambda i: processor(
            text=[prompts[i]], images=[framed[i]], return_tensors="pt", do_resize=False
        ),
    }
    print(f"\n## Collator encode, stage by stage (max_image_side {args.max_image_side}, {len(rows)} samples, 1 thread)")
    print(f"image processor: {type(processor.image_processor).__name__}")
    print("| stage | ms per sample |")
    print("|---|---|")
    for name, stage in stages.items():
        with one_thread():
            stage(0)
            start = time.perf_counter()
            for index in range(len(rows)):
                stage(index)
            seconds = time.perf_counter() - start
        print(f"| {name} | {seconds / len(rows) * 1000:.2f} |")


def bench_collator(processor, rows, args, family):
    print(f"\n## Collator (max_image_side {args.max_image_side}, max_seq_length {args.max_seq_length})")
    print("| padding | batch | real tokens / computed tokens | ms per sample |")
    print("|---|---|---|---|")
    batches = {}
    for layout in args.layouts:
        padding, batch_size = parse_layout(layout, args.batch_size)
        collator = GroundingCollator(
            processor, args.max_seq_length, args.max_image_side, padding=padding, family=family
        )
        start = time.perf_counter()
        batches[layout] = [collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
        per_sample_ms = (time.perf_counter() - start) / len(rows) * 1000
        real = sum(real_tokens(b) for b in batches[layout])
        computed = sum(b["input_ids"].numel() for b in batches[layout])
        print(f"| {padding} | {batch_size} | {real / computed:.1%} | {per_sample_ms:.1f} |")
        if collator.num_dropped:
            print(f"  ({collator.num_dropped} samples dropped as too long)")
    return batches


def bench_training(model, batches, args, label):
    optimizer = adamw(model, 1e-5)
    model.train()
    text_parameters, vision_parameters = parameter_split(model.base_model.model if args.lora else model)
    cuda = args.device == "cuda"
    peak_memory = {}
    for layout, layout_batches in batches.items():  # warm-up (allocator, kernels, lazy init) and peak memory
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        train_step(model, optimizer, max(layout_batches, key=lambda b: b["input_ids"].numel()), args.device)
        peak_memory[layout] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "n/a"
    round_seconds = {layout: [] for layout in batches}
    layouts = list(batches)
    for round_index in tqdm(range(args.rounds), desc="training rounds"):
        # Interleaved, in reverse order every other round: drift and position in a round hit all layouts alike.
        for layout in layouts if round_index % 2 == 0 else layouts[::-1]:
            seconds = 0.0
            for batch in batches[layout]:
                synchronize(args.device)
                start = time.perf_counter()
                train_step(model, optimizer, batch, args.device)
                synchronize(args.device)
                seconds += time.perf_counter() - start
            round_seconds[layout].append(seconds)
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if cuda and k in torch.cuda.get_device_name()), None)
    print(f"\n## Training step: forward + backward + AdamW ({label})")
    print("| padding | batch | samples/s | vs first (median round) | rounds' range | tokens/s | MFU | peak memory GiB |")
    print("|---|---|---|---|---|---|---|---|")
    samples_per_round = {layout: sum(len(b["image_grid_thw"]) for b in batches[layout]) for layout in batches}
    round_rates = {layout: [samples_per_round[layout] / s for s in round_seconds[layout]] for layout in batches}
    for layout, layout_batches in batches.items():
        padding, batch_size = parse_layout(layout, args.batch_size)
        # Each round's ratio to the first layout's rate in the same round, so slow rounds cancel out.
        ratios = [rate / first for rate, first in zip(round_rates[layout], round_rates[layouts[0]])]
        seconds = sum(round_seconds[layout])
        tokens = sum(real_tokens(b) for b in layout_batches) * args.rounds
        patches = sum(len(b["pixel_values"]) for b in layout_batches) * args.rounds
        flops = training_flops(text_parameters, vision_parameters, tokens, patches)
        mfu = f"{flops / seconds / peak_flops:.1%}" if peak_flops else "n/a"
        print(
            f"| {padding} | {batch_size} | {samples_per_round[layout] * args.rounds / seconds:.2f} "
            f"| {statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x "
            f"| {tokens / seconds:.0f} | {mfu} | {peak_memory[layout]} |"
        )
    print(
        f"vs first: each of the {args.rounds} rounds' samples/s over the first row's in the same round (layouts "
        "interleaved, in reverse order every other round): the median and the range.\n"
        "MFU: 6 x parameters x real tokens (vision: x patches) per second over the GPU's dense bf16 peak."
    )


PARITY_LAYOUTS = (
    ("max_length", "longest", "padding only: the size of kernel and rounding differences"),
    ("longest", "packed", "packing, on the same samples"),
)


def first_losses(args, model_dir, processor, batches, liger) -> list[float]:
    """The losses of the first training steps, from the same seeded initial weights for every configuration."""
    torch.manual_seed(args.seed)
    model = load_model(args, model_dir, processor, args.attn[0], liger)
    model.train()
    optimizer = adamw(model, PARITY_LR)
    losses = [train_step(model, optimizer, batch, args.device).item() for batch in batches]
    del model, optimizer
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return losses


def print_parity(a, b, why, losses_a, losses_b, setting):
    print(f"\n## Loss parity: {a} vs {b} ({why})")
    print(f"| step | loss, {a} | loss, {b} | abs diff | rel diff |")
    print("|---|---|---|---|---|")
    differences = [abs(x - y) for x, y in zip(losses_a, losses_b)]
    relative = [d / abs(x) for d, x in zip(differences, losses_a)]
    for step, row in enumerate(zip(losses_a, losses_b, differences, relative), 1):
        print(f"| {step} | {row[0]:.6f} | {row[1]:.6f} | {row[2]:.2e} | {row[3]:.2e} |")
    print(f"max abs diff {max(differences):.2e}, max rel diff {max(relative):.2e}; {setting}")


def bench_loss_parity(processor, rows, args, family, model_dir):
    """Do packing and Liger change what is learnt? Same weights, same samples: the losses should match."""
    steps, batch_size = args.parity_steps, args.batch_size
    if steps * batch_size > len(rows):
        raise SystemExit(f"--parity_steps {steps} x --batch_size {batch_size}: more than --num_samples {len(rows)}")
    rows = rows[: steps * batch_size]
    batches, losses = {}, {}
    for padding in PADDING_MODES:
        collator = GroundingCollator(processor, args.max_seq_length, args.max_image_side, padding=padding, family=family)
        batches[padding] = [collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
        losses[padding] = first_losses(args, model_dir, processor, batches[padding], liger=False)
    model = "Qwen2.5-VL-3B architecture, random init" if args.arch == "3b" else f"model {args.model or 'tiny, built here'}"
    dtype = "bf16" if args.device == "cuda" else "float32"
    setting = f"{steps} steps of {batch_size} samples; {model}, {args.attn[0]}, {dtype} on {args.device}"
    setting += f", AdamW lr {PARITY_LR:g}"
    for a, b, why in PARITY_LAYOUTS:
        print_parity(a, b, why, losses[a], losses[b], setting)
    liger_heading = "\n## Loss parity: packed vs packed + Liger\nskipped: "
    if importlib.util.find_spec("liger_kernel") is None:
        print(liger_heading + "liger-kernel not installed (pip install -r requirements-gpu.txt)")
    elif args.device != "cuda":
        print(liger_heading + "Liger's Triton kernels need a GPU")
    else:  # last: some of Liger's patches are process-wide (module attributes), not per model
        packed_liger = first_losses(args, model_dir, processor, batches["packed"], liger=True)
        print_parity("packed", "packed + Liger", "Liger's kernels", losses["packed"], packed_liger, setting)
    # Found by reading Liger's source: its Qwen2.5-VL rope patch replaces this function.
    defined = "defines it" if QWEN2_5_VL_HAS_MROPE_FUNCTION else (
        "does not define it (attention calls apply_rotary_pos_emb; mRoPE is applied in the rotary embedding), "
        "so that patch changes nothing"
    )
    print(
        f"Liger's rope patch for Qwen2.5-VL replaces modeling_qwen2_5_vl.apply_multimodal_rotary_pos_emb; transformers "
        f"{importlib.metadata.version('transformers')} {defined}."
    )


def bench_inference(model, processor, rows, args, family):
    model.eval()
    settings = ImageSettings.from_processor(processor, args.max_image_side, family)
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
    print(f"\n## Inference: generation.predict, greedy, {args.new_tokens} new tokens max, {len(sample)} samples")
    print("| batch size | samples/s | vs batch 1 |")
    print("|---|---|---|")
    for batch_size, rate in results.items():
        print(f"| {batch_size} | {rate:.2f} | {rate / results[1]:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", help="model dir (default: build the tiny model); its processor is used")
    parser.add_argument("--arch", default="model", choices=["model", "3b"], help="3b: random-init Qwen2.5-VL-3B sizes")
    parser.add_argument("--lora", action="store_true", help="train the LoRA config's adapters only")
    parser.add_argument("--liger", action="store_true", help="Liger kernels, as use_liger_kernel: true applies them")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--attn", nargs="+", default=["sdpa"], help="attention implementations to compare")
    parser.add_argument("--num_samples", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--layouts", nargs="+", default=list(PADDING_MODES), help="padding[:batch] per training row; the first is the 1.00x"
    )
    parser.add_argument("--max_image_side", type=int, default=DEFAULT_MAX_IMAGE_SIDE, help="the tutorial's value")
    parser.add_argument("--max_seq_length", type=int, default=256, help="the tutorial's value")
    parser.add_argument("--loading_sides", type=int, nargs="+", default=[256, 512, 1024], help="max_image_side values")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inference_samples", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--parity_steps", type=int, default=0, help="compare the first N steps' losses across layouts and Liger"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["loading", "encode", "training", "inference"])
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as workdir:
        model_dir, rows = build_inputs(args, workdir)
        processor = AutoProcessor.from_pretrained(model_dir)
        family = detect_family(model_dir)
        device = torch.cuda.get_device_name() if args.device == "cuda" else "no GPU"
        print(f"# Benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), {device}, {time.strftime('%Y-%m-%d')}")
        print(library_versions())
        print(f"command: python scripts/benchmark.py {' '.join(sys.argv[1:])}")
        if "loading" not in args.skip:
            bench_loading(processor, rows, args, family, *parameter_split_3b(processor))
        if "encode" not in args.skip:
            bench_encode_stages(processor, rows, args, family)
        if args.parity_steps:
            bench_loss_parity(processor, rows, args, family, model_dir)
        if "training" in args.skip and "inference" in args.skip:
            return
        batches = bench_collator(processor, rows, args, family)
        for attn_implementation in args.attn:
            model = load_model(args, model_dir, processor, attn_implementation, args.liger)
            if "training" not in args.skip:
                options = [args.arch, "LoRA" if args.lora else "full", attn_implementation, args.device]
                options += ["Liger"] * args.liger + ["gradient checkpointing"] * args.gradient_checkpointing
                bench_training(model, batches, args, ", ".join(options))
            if "inference" not in args.skip and not args.lora:
                bench_inference(model, processor, rows, args, family)
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
