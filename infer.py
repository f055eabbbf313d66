"""Evaluate a grounding model on the converter's JSONL: predictions, Acc@IoU, mean IoU and pictures.

    python infer.py --model_name_or_path outputs/merged --test_dataset_name data/test.jsonl --output_dir outputs/eval
    python infer.py --model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct --adapter outputs/lora \\
        --test_dataset_name data/test.jsonl --output_dir outputs/eval_lora
    accelerate launch infer.py ...   # the test set is split across processes, one merged result

A base model works too (zero-shot). The prompt and the image resize are training's (utils.py and
the grounding_image_settings.json saved beside the model); predicted boxes are mapped back to
original pixels before scoring. OUT receives predictions.jsonl, metrics.json and vis/.

Decoding is plain greedy whatever the checkpoint's generation_config.json says (Qwen2.5-VL's sets
repetition_penalty 1.05, which penalises the digits a box repeats); --use_checkpoint_generation_config
opts back in. Finished batches are appended to OUT/predictions.partial.<rank>.jsonl, so a killed run
started again with the same arguments continues where it stopped.
"""

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import warnings

import torch
from accelerate import PartialState
from peft import PeftModel
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from model_families import check_settings_family, detect_family
from pictures import draw_prediction, make_grid
from scoring import evaluate, plain_greedy, predict, read_true_boxes, summary_table
from utils import (
    DEFAULT_MAX_IMAGE_SIDE,
    IMAGE_SETTINGS_FILE,
    ImageSettings,
    load_sft_jsonl,
    processor_dir,
    write_json_atomic,
    write_jsonl_atomic,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="a full model: base, fine-tuned or merged")
    parser.add_argument("--adapter", help="a LoRA adapter dir to apply on top of --model_name_or_path")
    parser.add_argument("--test_dataset_name", required=True, help="the converter's test.jsonl")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=16, help="per process")
    parser.add_argument("--max_image_side", type=int, help=f"default: training's value from {IMAGE_SETTINGS_FILE}")
    parser.add_argument("--limit", type=int, help="only the first N test samples")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--num_vis", type=int, default=16, help="pictures drawn into OUT/vis")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--report_to", default="none", choices=["none", "swanlab"])
    parser.add_argument("--run_name", help="SwanLab experiment name (default: eval-<model dir name>)")
    parser.add_argument(
        "--use_checkpoint_generation_config", action="store_true",
        help="decode with the checkpoint's generation_config.json (e.g. its repetition_penalty), not plain greedy",
    )  # fmt: skip
    return parser.parse_args()


# ---------------------------------------------------------------- resuming
PARTIAL_PATTERN = "predictions.partial.*.jsonl"


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_model(path):
    """A local model dir as its files' names, sizes and modification times (re-training or replacing
    it changes them; hashing gigabytes of weights would not pay); a hub id as itself."""
    if not path or not os.path.isdir(path):
        return path
    files = sorted((entry.name, entry.stat()) for entry in os.scandir(path) if entry.is_file())
    return {"dir": os.path.abspath(path), "files": {name: [stat.st_size, stat.st_mtime_ns] for name, stat in files}}


def run_fingerprint(args, settings) -> dict:
    """Everything that decides the predictions: a partial run is resumed only under the same one."""
    return {
        "test_dataset": [os.path.abspath(args.test_dataset_name), file_sha256(args.test_dataset_name)],
        "model": describe_model(args.model_name_or_path),
        "adapter": describe_model(args.adapter),
        "image_settings": dataclasses.asdict(settings),
        **{name: getattr(args, name) for name in ("limit", "batch_size", "max_new_tokens", "dtype")},
        "use_checkpoint_generation_config": args.use_checkpoint_generation_config,
    }


def read_partial_runs(output_dir, fingerprint) -> dict[int, list[dict]]:
    """{batch start: its predictions} from every rank's partial file of an interrupted run. A line cut
    short by the kill is dropped (that batch runs again); another evaluation's file is refused."""
    done = {}
    for path in sorted(glob.glob(os.path.join(output_dir, PARTIAL_PATTERN))):
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")[:-1]  # the last piece is "" or a line the kill cut short
        if not lines:
            continue
        try:
            saved = json.loads(lines[0])["fingerprint"]
            entries = [json.loads(line) for line in lines[1:]]
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{path}: not a partial predictions file ({error}); delete it to start over") from error
        if saved != fingerprint:
            changed = ", ".join(key for key in fingerprint if saved.get(key) != fingerprint[key])
            raise ValueError(
                f"{path} holds a partial run of another evaluation (changed: {changed}). Use another --output_dir, "
                f"or delete {os.path.join(output_dir, PARTIAL_PATTERN)} to start this one over."
            )
        done.update((entry["batch_start"], entry["predictions"]) for entry in entries)
    return done


def open_partial_file(output_dir, rank, fingerprint):
    """This process's partial file for appending, with a line cut short by a kill removed first."""
    path = os.path.join(output_dir, f"predictions.partial.{rank}.jsonl")
    if os.path.exists(path):
        with open(path, "rb+") as f:
            f.truncate(f.read().rfind(b"\n") + 1)
    f = open(path, "a", encoding="utf-8")
    if f.tell() == 0:
        f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
    return f


def resolve_image_settings(processor, settings_dirs, max_image_side, family) -> ImageSettings:
    """--max_image_side > the settings saved by training (first dir that has them) > a default, with warnings.
    Saved settings of another coordinate system than the model family's raise ValueError."""
    found = [(d, s) for d in settings_dirs if (s := ImageSettings.load(d)) is not None]
    if found:
        check_settings_family(found[0][1], family, found[0][0])
    if max_image_side is None:
        if found:
            return found[0][1]
        warnings.warn(
            f"no {IMAGE_SETTINGS_FILE} in {' or '.join(settings_dirs)}: the training's image size is unknown, "
            f"using max_image_side={DEFAULT_MAX_IMAGE_SIDE}. Pass --max_image_side to match training."
        )
        return ImageSettings.from_processor(processor, DEFAULT_MAX_IMAGE_SIDE, family)
    if not found:
        return ImageSettings.from_processor(processor, max_image_side, family)
    directory, saved = found[0]
    if saved.max_image_side != max_image_side:
        warnings.warn(
            f"--max_image_side {max_image_side} differs from the {saved.max_image_side} the model was trained with "
            f"({os.path.join(directory, IMAGE_SETTINGS_FILE)})"
        )
    return dataclasses.replace(saved, max_image_side=max_image_side)


def save_pictures(records, output_dir, num_vis) -> list[str]:
    """Draw the first num_vis samples and their grid.jpg into OUT/vis (replaced whole); return the sample paths."""
    vis_dir = os.path.join(output_dir, "vis")
    tmp_dir = f"{vis_dir}.tmp-{os.getpid()}"
    os.makedirs(tmp_dir)
    pictures = [draw_prediction(record) for record in records[:num_vis]]
    names = [f"{index:05d}.jpg" for index in range(len(pictures))]
    for picture, name in zip(pictures, names):
        picture.save(os.path.join(tmp_dir, name), quality=90)
    if pictures:
        make_grid(pictures).save(os.path.join(tmp_dir, "grid.jpg"), quality=90)
    shutil.rmtree(vis_dir, ignore_errors=True)
    os.replace(tmp_dir, vis_dir)
    return [os.path.join(vis_dir, name) for name in names]


def log_to_swanlab(args, model_name, metrics, picture_paths) -> None:
    import swanlab

    name = args.run_name or f"eval-{model_name}"
    swanlab.init(project=os.getenv("SWANLAB_PROJECT"), name=name, job_type="eval", config=vars(args))
    scalars = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
    for bucket, figures in metrics["by_size"].items():
        scalars.update({f"{bucket}/{key}": value for key, value in figures.items() if value is not None})
    for bucket, figures in metrics.get("by_count", {}).items():  # list rows, by number of true objects
        scalars.update({f"{bucket} objects/{key}": value for key, value in figures.items() if value is not None})
    swanlab.log({f"eval/{key}": value for key, value in scalars.items() if value is not None})
    if picture_paths:
        grid_path = os.path.join(os.path.dirname(picture_paths[0]), "grid.jpg")
        swanlab.log({"eval/grid": swanlab.Image(grid_path), "eval/samples": [swanlab.Image(p) for p in picture_paths]})
    swanlab.finish()


def main():
    args = parse_args()
    state = PartialState(cpu=not torch.accelerator.is_available())  # several CPU processes talk over gloo
    rows = load_sft_jsonl(args.test_dataset_name)[: args.limit]
    if not rows:
        raise SystemExit(f"{args.test_dataset_name}: no test samples")
    try:
        true_boxes = read_true_boxes(args.test_dataset_name, rows)  # before the model loads: fails in seconds
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from error

    settings_dirs = [d for d in (args.adapter, args.model_name_or_path) if d]
    try:
        family = detect_family(args.model_name_or_path)  # an unsupported model fails before anything loads
        processor = AutoProcessor.from_pretrained(processor_dir(args.adapter, args.model_name_or_path))
        settings = resolve_image_settings(processor, settings_dirs, args.max_image_side, family)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    fingerprint = run_fingerprint(args, settings)
    os.makedirs(args.output_dir, exist_ok=True)
    try:
        done = read_partial_runs(args.output_dir, fingerprint)
    except ValueError as error:
        raise SystemExit(str(error)) from error

    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=args.dtype)
    checkpoint_config = model.generation_config
    if not args.use_checkpoint_generation_config:
        model.generation_config = plain_greedy(checkpoint_config)  # before PeftModel, which generates with it
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
    model.to(state.device).eval()

    # Whole batches go to each process, so every batch (and its padding) is the one a single process would run.
    batch_starts = list(range(0, len(rows), args.batch_size))
    todo = [start for start in batch_starts if start not in done]
    if state.is_main_process:
        print(f"{len(rows)} test samples, {state.num_processes} process(es) on {state.device}, {settings}")
        decoding = "the checkpoint's generation_config" if args.use_checkpoint_generation_config else "plain greedy"
        print(f"decoding: {decoding} (the checkpoint's repetition_penalty is {checkpoint_config.repetition_penalty})")
        if done:
            print(f"resuming: {len(done)} of {len(batch_starts)} batches already in {args.output_dir}")
    state.wait_for_everyone()  # every process has read the partial files before any appends to them
    partial = open_partial_file(args.output_dir, state.process_index, fingerprint)
    with state.split_between_processes(todo) as starts, partial:
        for start in tqdm(starts, desc="generating", disable=not state.is_local_main_process):
            batch = rows[start : start + args.batch_size]
            batch_predictions = predict(
                model, processor, batch, settings, args.batch_size, args.max_new_tokens, show_progress=False
            )
            partial.write(json.dumps({"batch_start": start, "predictions": batch_predictions}) + "\n")
            partial.flush()
    state.wait_for_everyone()
    if not state.is_main_process:
        return

    done = read_partial_runs(args.output_dir, fingerprint)
    predictions = [prediction for start in batch_starts for prediction in done[start]]
    records, metrics = evaluate(rows, true_boxes, predictions)
    metrics = {"model": args.adapter or args.model_name_or_path, "test_dataset": args.test_dataset_name, **metrics}
    for record in records:
        if record["error"]:
            print(f"warning: {record['image']} not scored: {record['error']}")
    picture_paths = save_pictures([r for r in records if r["error"] is None], args.output_dir, args.num_vis)
    write_jsonl_atomic(os.path.join(args.output_dir, "predictions.jsonl"), records)
    write_json_atomic(os.path.join(args.output_dir, "metrics.json"), metrics)
    for path in glob.glob(os.path.join(args.output_dir, PARTIAL_PATTERN)):
        os.remove(path)  # after the final files exist: a kill before this only repeats the writing
    model_name = os.path.basename(os.path.normpath(args.adapter or args.model_name_or_path))
    print("\n" + summary_table(model_name, metrics))
    print(f"predictions, metrics and pictures written to {args.output_dir}")
    if args.report_to == "swanlab":
        log_to_swanlab(args, model_name, metrics, picture_paths)


if __name__ == "__main__":
    main()
