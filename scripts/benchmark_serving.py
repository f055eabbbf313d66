"""Samples/s of infer.py's two backends side by side, in one run: HF generate at a few batch sizes, then a served
copy of the same model (infer.py --backend openai) at a few concurrencies, and how many boxes each gives equal
to HF generate's at batch 1.

    python scripts/benchmark_serving.py --model_name_or_path outputs/merged --test_dataset_name data/test.jsonl
    python scripts/benchmark_serving.py ... --server vllm --device cuda    # what scripts/gpu_check.sh runs
    python scripts/benchmark_serving.py ... --base_url http://localhost:30000/v1   # a server already running (SGLang)

--server starts `transformers serve` or `vllm serve` on the model directory on a free local port and stops it at
the end. Greedy decoding, --max_new_tokens, the model's own image settings; the first samples warm up each setting
before it is timed. Prints a markdown table.
"""

import argparse
import json
import os
import shlex
import sys
import time

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backends import OpenAIBackend, free_port, local_server  # noqa: E402
from generation import plain_greedy, predict  # noqa: E402
from model_families import detect_family  # noqa: E402
from utils import DEFAULT_MAX_IMAGE_SIDE, IMAGE_SETTINGS_FILE, ImageSettings, load_sft_jsonl  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help=f"a model dir (its {IMAGE_SETTINGS_FILE})")
    parser.add_argument("--test_dataset_name", required=True, help="the converter's test.jsonl")
    parser.add_argument("--limit", type=int, default=32, help="samples timed per setting")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16], help="HF generate")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="requests in flight")
    parser.add_argument("--server", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--server_args", default="", help='more flags for the server, e.g. "--continuous-batching"')
    parser.add_argument("--base_url", help="benchmark this running server instead of starting one")
    parser.add_argument("--device", default="cpu", help="for HF generate and the started server")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--server_log", default="benchmark_server.log")
    return parser.parse_args()


def server_command(args, settings, port) -> list[str]:
    """The server on the model dir; vLLM with its frame limits and vLLM's own sampling defaults (docs/serving.md)."""
    bin_dir = os.path.dirname(sys.executable)
    if args.server == "transformers":
        return [os.path.join(bin_dir, "transformers"), "serve", args.model_name_or_path, "--host", "127.0.0.1",
                "--port", str(port), "--device", args.device, *shlex.split(args.server_args)]  # fmt: skip
    pixels = json.dumps({"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels})
    return [os.path.join(bin_dir, "vllm"), "serve", args.model_name_or_path, "--host", "127.0.0.1",
            "--port", str(port), "--generation-config", "vllm", "--limit-mm-per-prompt", '{"image": 1}',
            "--mm-processor-kwargs", pixels, *shlex.split(args.server_args)]  # fmt: skip


def timed(run, rows) -> tuple[float, list[dict]]:
    run(rows[:2])  # warm-up: first calls pay for allocations and kernels
    start = time.perf_counter()
    predictions = run(rows)
    return len(rows) / (time.perf_counter() - start), predictions


def same_boxes(predictions, reference) -> str:
    """How many answers have the same text (so the same box) as the reference's; transformers serve strips the
    whitespace around an answer, so that is not compared."""
    texts = [((p["raw_output"] or "").strip(), (r["raw_output"] or "").strip()) for p, r in zip(predictions, reference)]
    equal = sum(text == reference_text for text, reference_text in texts)
    return f"{equal}/{len(reference)}"


def main():
    args = parse_args()
    rows = load_sft_jsonl(args.test_dataset_name)[: args.limit]
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    settings = ImageSettings.load(args.model_name_or_path)
    if settings is None:  # a base model (the GPU check's): infer.py's default frame
        family = detect_family(args.model_name_or_path)
        settings = ImageSettings.from_processor(processor, DEFAULT_MAX_IMAGE_SIDE, family)
        print(f"no {IMAGE_SETTINGS_FILE} in {args.model_name_or_path}: max_image_side {DEFAULT_MAX_IMAGE_SIDE}")
    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype="auto").to(args.device).eval()
    model.generation_config = plain_greedy(model.generation_config)
    results, reference = [], None
    for batch_size in args.batch_sizes:
        def run_hf(some_rows, batch_size=batch_size):
            return predict(model, processor, some_rows, settings, batch_size, args.max_new_tokens, show_progress=False)

        rate, predictions = timed(run_hf, rows)
        reference = reference or predictions  # the first batch size (1) is the reference
        results.append(("HF generate", f"batch {batch_size}", rate, predictions))
    del model  # the server gets the device to itself
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    server_name = f"served ({args.base_url or ' '.join([args.server, 'serve', args.server_args]).strip()})"

    def run_served(base_url):
        for concurrency in args.concurrency:
            api_key = os.getenv("OPENAI_API_KEY", "EMPTY")
            backend = OpenAIBackend(base_url, api_key, None, args.max_new_tokens, concurrency)
            rate, predictions = timed(lambda some_rows: backend.predict(some_rows, settings), rows)
            results.append((server_name, f"concurrency {concurrency}", rate, predictions))

    if args.base_url:
        run_served(args.base_url)
    else:
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": os.getenv("HF_HUB_OFFLINE", "1")}
        with local_server(server_command(args, settings, port), port, args.server_log, env=env) as base_url:
            run_served(base_url)

    threads = os.getenv("OMP_NUM_THREADS", "unset")
    print(f"\n## infer.py backends: {len(rows)} samples of {args.test_dataset_name}, greedy, "
          f"{args.max_new_tokens} new tokens max, device {args.device}, OMP_NUM_THREADS={threads}\n")  # fmt: skip
    print("| backend | setting | samples/s | answers equal to HF batch 1 |")
    print("|---|---|---|---|")
    for backend, setting, rate, predictions in results:
        print(f"| {backend} | {setting} | {rate:.2f} | {same_boxes(predictions, reference)} |")


if __name__ == "__main__":
    main()
