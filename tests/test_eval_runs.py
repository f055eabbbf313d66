"""infer.py as a long evaluation meets it: SIGKILLed and started again (one process and two under
`accelerate launch`), refusing to mix in a partial run of another evaluation, and decoding plain
greedy whatever the checkpoint's generation config says; then scripts/compare_evals.py over a
TextVQA-schema and a RefCOCO-schema test set. The untrained tiny model answers no boxes but its text
is deterministic, so identical raw outputs prove identical runs."""

import glob
import json
import re
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ACCELERATE_2, REPO_DIR, infer_command, run_infer, run_script

NUM_TEST = 14


@pytest.fixture(scope="module")
def test_sets(synthetic_dataset_dir, tmp_path_factory):
    """{"textvqa": test.jsonl of NUM_TEST samples (and train.jsonl), "refcoco": a converted val split}."""
    root = tmp_path_factory.mktemp("eval_runs")
    run_script(
        "scripts/convert2sft_format.py", "--data_path", synthetic_dataset_dir, "--save_path", root / "textvqa",
        "--train_range", f"{NUM_TEST}:36", "--val_range", "36:40", "--test_range", f"0:{NUM_TEST}", "--num_workers", 1,
    )  # fmt: skip
    run_script(
        "scripts/make_synthetic_data.py", "--output_dir", root / "refcoco_source", "--num_samples", 3, "--seed", 2,
        "--schema", "refcoco", "--split", "val",
    )  # fmt: skip
    run_script(
        "scripts/convert2sft_format.py", "--data_path", root / "refcoco_source", "--save_path", root / "refcoco",
        "--split", "val", "--query_column", "answer", "--type", "test", "--test_range", "0:", "--num_workers", 1,
    )  # fmt: skip
    return {"textvqa": root / "textvqa" / "test.jsonl", "refcoco": root / "refcoco" / "test.jsonl"}


def eval_args(model_dir, test_file):
    return ["--model_name_or_path", model_dir, "--test_dataset_name", test_file, "--max_image_side", 112,
            "--num_vis", 2]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, test_sets, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    run_infer(*eval_args(tiny_model_dir, test_sets["textvqa"]), output_dir=output_dir, batch_size=1)
    return output_dir


def finished_batches(output_dir) -> int:
    lines = [line for path in glob.glob(str(output_dir / "predictions.partial.*.jsonl")) for line in open(path)]
    return sum(line.startswith('{"batch_start"') and line.endswith("\n") for line in lines)


@pytest.mark.parametrize("launcher", [[sys.executable], ACCELERATE_2], ids=["one_process", "two_processes"])
def test_killed_run_resumes_to_the_uninterrupted_result(launcher, uninterrupted, tiny_model_dir, test_sets, tmp_path):
    args = eval_args(tiny_model_dir, test_sets["textvqa"])
    command, env = infer_command(*args, output_dir=tmp_path, launcher=launcher, batch_size=1)
    process = subprocess.Popen(command, cwd=REPO_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while finished_batches(tmp_path) < 1:
            assert process.poll() is None, "infer.py ended before it could be killed"
            assert time.time() < deadline, "infer.py wrote no batch"
            time.sleep(0.01)
    finally:  # SIGKILL the launcher and every worker (torch's launcher starts them in their own sessions)
        for running in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
            running.kill()
        process.wait()
    assert not (tmp_path / "predictions.jsonl").exists() and 1 <= finished_batches(tmp_path) < NUM_TEST

    if launcher != ACCELERATE_2:  # once is enough: another test set under the same dir is refused, nothing lost
        before = {path: open(path).read() for path in glob.glob(str(tmp_path / "predictions.partial.*.jsonl"))}
        other_set = eval_args(tiny_model_dir, test_sets["refcoco"])
        command, env = infer_command(*other_set, output_dir=tmp_path, batch_size=1)
        other = subprocess.run(command, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=300)
        assert other.returncode != 0 and "partial run of another evaluation (changed: test_dataset)" in other.stderr
        assert {path: open(path).read() for path in before} == before

    result, _, _ = run_infer(*args, output_dir=tmp_path, launcher=launcher, batch_size=1)
    resumed = int(re.search(rf"resuming: (\d+) of {NUM_TEST} batches", result.stdout).group(1))
    assert 1 <= resumed < NUM_TEST
    for name in ("predictions.jsonl", "metrics.json"):
        assert (tmp_path / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert not glob.glob(str(tmp_path / "predictions.partial.*"))


def test_decoding_ignores_the_checkpoints_repetition_penalty_unless_asked(
    uninterrupted, tiny_model_dir, test_sets, tmp_path
):
    penalised = shutil.copytree(tiny_model_dir, tmp_path / "penalised")
    with open(penalised / "generation_config.json") as f:
        generation_config = json.load(f)
    with open(penalised / "generation_config.json", "w") as f:
        json.dump({**generation_config, "repetition_penalty": 5.0}, f)
    args = [*eval_args(penalised, test_sets["textvqa"]), "--limit", 4]
    result, greedy, _ = run_infer(*args, output_dir=tmp_path / "greedy", batch_size=1)
    assert "plain greedy (the checkpoint's repetition_penalty is 5.0)" in result.stdout
    opt_in = [*args, "--use_checkpoint_generation_config"]
    _, opted_in, _ = run_infer(*opt_in, output_dir=tmp_path / "opted_in", batch_size=1)
    # The same text as the model whose config has no penalty, token for token; opting in changes it.
    without_penalty = (uninterrupted / "predictions.jsonl").read_text().splitlines(keepends=True)[:4]
    assert (tmp_path / "greedy" / "predictions.jsonl").read_text() == "".join(without_penalty)
    assert [p["raw_output"] for p in opted_in] != [p["raw_output"] for p in greedy]


def test_compare_evals_puts_models_and_test_sets_in_one_table(uninterrupted, tiny_model_dir, test_sets, tmp_path):
    train = test_sets["textvqa"].parent / "train.jsonl"
    for name, test_file in test_sets.items():
        baseline = ["--train_dataset_name", train, "--test_dataset_name", test_file, "--output_dir", tmp_path / name]
        run_script("scripts/mean_box_baseline.py", *baseline)
    run_infer(*eval_args(tiny_model_dir, test_sets["refcoco"]), output_dir=tmp_path / "tiny_refcoco")
    dirs = [tmp_path / "textvqa", tmp_path / "refcoco", uninterrupted, tmp_path / "tiny_refcoco"]
    result = run_script("scripts/compare_evals.py", *dirs, "--output", tmp_path / "table.md")

    table = (tmp_path / "table.md").read_text()
    assert table in result.stdout
    header, _, baseline_row, model_row = (line.strip("|").split(" | ") for line in table.strip().splitlines())
    columns = ("Acc@0.5", "mean IoU", "small Acc@0.5", "mAP", "mAP scores 1")
    names = ("textvqa", "refcoco")
    assert [cell.strip() for cell in header] == ["model"] + [f"{test_sets[n]} {c}" for n in names for c in columns]
    assert baseline_row[0].strip() == "mean box" and model_row[0].strip() == str(tiny_model_dir)
    for index, name in enumerate(names):
        baseline = json.loads((tmp_path / name / "metrics.json").read_text())
        model = json.loads((dirs[2 + index] / "metrics.json").read_text())
        for offset, key in enumerate(("acc@0.5", "mean_iou")):
            cell = 1 + 5 * index + offset
            assert baseline_row[cell].strip() == f"{baseline[key]:.4f}"
            assert model_row[cell].strip() == f"{model[key]:.4f} ({model[key] - baseline[key]:+.4f})"
        assert baseline_row[3 + 5 * index].strip().endswith(f"(n={baseline['by_size']['small']['count']})")
        # mAP ranked by confidence: the mean box has none to rank by; the model's is its own (no reference).
        assert baseline_row[4 + 5 * index].strip() == "n/a" and model_row[4 + 5 * index].strip() == f"{model['map']:.4f}"
    assert any(" (-0." in cell for cell in model_row)  # the untrained model is worse than the mean box somewhere

    missing = run_script("scripts/compare_evals.py", tmp_path / "textvqa", tmp_path / "nothing", check=False)
    assert missing.returncode != 0 and f"{tmp_path / 'nothing'}/metrics.json not found" in missing.stderr


def test_compare_evals_retention_table_against_the_base(tmp_path):
    """Hand-written metrics.json files: the base and the mixed run from one mixed test file each, the
    grounding-only run from two files (grounding, then VQA)."""
    by_size = {"small": {"acc@0.5": None, "count": 0}}
    runs = {
        "base": [("mixed.jsonl", 0.10, 20, 0.80, 10)],
        "sft": [("test.jsonl", 0.60, 20, None, 0), ("test_vqa.jsonl", None, 0, 0.20, 10)],
        "sft_mix": [("mixed.jsonl", 0.58, 20, 0.75, 10)],
    }
    dirs = []
    for model, evaluations in runs.items():
        for test_set, acc, count, vqa, vqa_count in evaluations:
            directory = tmp_path / f"{model}_{test_set}"
            directory.mkdir()
            metrics = {"model": model, "test_dataset": test_set, "by_size": by_size, "num_samples": count,
                       "acc@0.5": acc, "vqa_num_samples": vqa_count, "vqa_accuracy": vqa}  # fmt: skip
            (directory / "metrics.json").write_text(json.dumps(metrics))
            dirs.append(directory)
    run_script("scripts/compare_evals.py", "--retention", *dirs, "--output", tmp_path / "table.md")
    assert (tmp_path / "table.md").read_text().splitlines() == [
        "| model | grounding Acc@0.5 | VQA accuracy |",
        "|---|---|---|",
        "| base | 0.1000 | 0.8000 |",
        "| sft | 0.6000 (+0.5000) | 0.2000 (-0.6000) |",
        "| sft_mix | 0.5800 (+0.4800) | 0.7500 (-0.0500) |",
    ]
