"""Serving what was trained: infer.py --backend openai against a real `transformers serve` on CPU (both
families) gives HF generate's boxes; a server that is down or a request that fails is handled."""

import argparse
import json
import math
import os
import subprocess
import sys

import httpx2
import openai
import pytest

import backends
import infer
import scoring
from answers import BOX, BOXES, CHAT_TEMPLATE_KWARGS, PROMPT_SUFFIX, render_prompt
from conftest import ANSWERING_STEPS, REPO_DIR, infer_command, run_script, train
from model_card import CARD_FILE, card_metadata
from model_families import FAMILIES
from utils import IMAGE_SETTINGS_FILE, ImageSettings, load_sft_jsonl


@pytest.fixture(scope="module")
def trained_models(answering_model):
    """Both tiny families trained on 4 samples until they answer them (conftest), each with a checkpoint."""
    return {family: answering_model(family) for family in ("qwen2_5_vl", "qwen3_vl")}


def transformers_serve(model_dir, log_path):
    """`transformers serve MODEL_DIR` on a free local port, on CPU with one thread (stopped when the block ends)."""
    port = backends.free_port()
    command = [os.path.join(os.path.dirname(sys.executable), "transformers"), "serve", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return backends.local_server(command, port, log_path, env=env, startup_timeout=120)


def infer_cli(*args, output_dir):
    """infer.py with room for a whole 0-1000 box (Qwen3-VL's digits are one token each here)."""
    env = {"OMP_NUM_THREADS": "1"}
    result = run_script("infer.py", *args, "--output_dir", output_dir, "--max_new_tokens", 40, env=env)
    with open(output_dir / "predictions.jsonl") as f:
        predictions = [json.loads(line) for line in f]
    with open(output_dir / "metrics.json") as f:
        return result, predictions, json.load(f)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_served_model_gives_hf_generates_boxes(family, trained_models, data_dir, tmp_path):
    """At batch 1 (no padding) both backends run the same prompt on the same pixels with greedy decoding on
    the same CPU float32 weights: raw answers and boxes must be identical, no tolerance. (transformers serve
    strips whitespace around an answer; the trained answers start with '{', so the texts compare exactly.)"""
    model_dir = trained_models[family]
    test_set = ["--model_name_or_path", model_dir, "--test_dataset_name", data_dir / "eval.jsonl", "--num_vis", 2]
    _, hf, hf_metrics = infer_cli(*test_set, "--batch_size", 1, output_dir=tmp_path / "hf")
    with transformers_serve(model_dir, tmp_path / "serve.log") as base_url:
        openai_args = ["--backend", "openai", "--base_url", base_url, "--concurrency", 4, "--batch_size", 4]
        result, served, served_metrics = infer_cli(*test_set, *openai_args, output_dir=tmp_path / "served")
    assert [p["raw_output"] for p in served] == [p["raw_output"] for p in hf]
    assert [p["pred_bbox"] for p in served] == [p["pred_bbox"] for p in hf]
    assert sum(p["pred_bbox"] is not None for p in served) >= 4, [p["raw_output"] for p in served]  # real boxes
    assert served_metrics["failed_samples"] == hf_metrics["failed_samples"] == 1  # eval.jsonl's corrupt image
    served_metrics.pop("model"), hf_metrics.pop("model")  # the model dir in both: the same
    # transformers serve refuses logprobs: no confidences, so no mAP ranked by them; constant-score mAP agrees.
    assert all(p["confidence"] is None for p in served) and served_metrics["map"] is None
    ranked = ("map", "map_50", "map_75")
    assert {k: v for k, v in served_metrics.items() if k not in ranked} == {k: v for k, v in hf_metrics.items() if k not in ranked}
    assert os.path.isfile(tmp_path / "served" / "vis" / "grid.jpg")
    assert "at " + base_url in result.stdout


def test_server_that_is_down_fails_naming_the_url(tiny_model_dir, data_dir, tmp_path):
    base_url = f"http://127.0.0.1:{backends.free_port()}/v1"  # nothing listens there
    command, env = infer_command(
        "--model_name_or_path", tiny_model_dir, "--test_dataset_name", data_dir / "test.jsonl",
        "--backend", "openai", "--base_url", base_url, output_dir=tmp_path / "out",
    )  # fmt: skip
    result = subprocess.run(command, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"no OpenAI-compatible server answers at {base_url}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


class ScriptedServer:
    """Stands in for client.chat.completions.create: an error status for one image, or the connection lost."""

    def __init__(self, failing_image=None, connection_lost=False):
        self.failing_image, self.connection_lost, self.calls = failing_image, connection_lost, 0

    def create(self, model, messages, **sampling):
        self.calls += 1
        request = httpx2.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
        if self.connection_lost:
            raise openai.APIConnectionError(request=request)
        question = messages[0]["content"][1]["text"]
        if self.failing_image in question:
            raise openai.InternalServerError("boom", response=httpx2.Response(500, request=request), body=None)
        content = '{"bbox_2d": [1, 2, 30, 40]}'
        return openai.types.chat.ChatCompletion.model_validate({
            "id": "x", "created": 0, "model": model, "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        })  # fmt: skip


def scripted_backend(processor, server):
    backend = backends.OpenAIBackend("http://127.0.0.1:1/v1", "EMPTY", "served", 24, concurrency=3)
    backend.client = type("Client", (), {"chat": type("Chat", (), {"completions": server})()})()
    return backend


class ServerWithLogprobs:
    """Answers every request with one box and the log-probabilities of its tokens, as vLLM does for logprobs=True."""

    TOKENS = ['{"', "bbox", "_", "2", "d", '":', " [", "1", ",", " ", "2", ",", " ", "3", "0", ",", " ", "4", "0", "]}"]
    # The coarse rule reads every digit but each number's last: the 3 of 30 and the 4 of 40.
    PROBABILITIES = {13: 0.5, 17: 0.8, 7: 0.1, 14: 0.2}  # token index -> probability; the 1 and the 0s are last digits

    def __init__(self):
        self.sampling = None

    def create(self, model, messages, **sampling):
        self.sampling = sampling
        content = [
            {"token": token, "logprob": math.log(self.PROBABILITIES.get(index, 1.0)), "bytes": None, "top_logprobs": []}
            for index, token in enumerate(self.TOKENS)
        ]
        return openai.types.chat.ChatCompletion.model_validate({
            "id": "x", "created": 0, "model": model, "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"content": content},
                         "message": {"role": "assistant", "content": "".join(self.TOKENS)}}],
        })  # fmt: skip


def test_server_logprobs_give_each_box_its_confidence(processor, data_dir):
    rows = load_sft_jsonl(data_dir / "test.jsonl")[:2]
    settings = ImageSettings.from_processor(processor, 56, FAMILIES["qwen2_5_vl"])
    server = ServerWithLogprobs()
    backend = backends.OpenAIBackend("http://127.0.0.1:1/v1", "EMPTY", "served", 24, concurrency=2, logprobs=True)
    backend.client = type("Client", (), {"chat": type("Chat", (), {"completions": server})()})()
    predictions = backend.predict(rows, settings)
    assert server.sampling["logprobs"] is True
    assert [p["confidence"] for p in predictions] == pytest.approx([0.5 * 0.8] * 2)


def test_request_failing_after_retries_is_a_failed_sample_and_a_lost_server_stops(processor, data_dir):
    rows = load_sft_jsonl(data_dir / "test.jsonl")[:5]
    for row in rows:
        row["user"] += f" {os.path.basename(row['image'][0])}"  # lets the scripted server pick one sample
    settings = ImageSettings.from_processor(processor, 56, FAMILIES["qwen2_5_vl"])
    failing = os.path.basename(rows[2]["image"][0])
    predictions = scripted_backend(processor, ScriptedServer(failing)).predict(rows, settings)
    assert [p["error"] is None for p in predictions] == [True, True, False, True, True]  # in order, none lost
    assert "answered with an error" in predictions[2]["error"] and rows[2]["image"][0] in predictions[2]["error"]
    assert all(p["pred_bbox"] for i, p in enumerate(predictions) if i != 2)
    true_boxes = scoring.read_true_boxes("test.jsonl", rows)
    _, metrics = scoring.evaluate(rows, true_boxes, predictions)
    assert (metrics["failed_samples"], metrics["num_samples"]) == (1, 4)

    with pytest.raises(backends.ServerUnreachable, match="127.0.0.1:1/v1 stopped answering"):
        scripted_backend(processor, ScriptedServer(connection_lost=True)).predict(rows, settings)


def test_messages_render_to_the_hf_prompt(processor):
    """What the server renders from the request (transformers serve's own conversion, then the model's chat
    template) is the text HF generate is given."""
    from PIL import Image
    from transformers.cli.serving.utils import BaseHandler, Modality

    question = "where is the red square?"
    for kind in (BOX, BOXES):
        sent = backends.chat_messages(question, kind, Image.new("RGB", (56, 28)))
        rendered = processor.apply_chat_template(
            BaseHandler.get_processor_inputs_from_messages(sent, Modality.VLM), add_generation_prompt=True,
            tokenize=False, **CHAT_TEMPLATE_KWARGS,  # the request's chat_template_kwargs
        )  # fmt: skip
        assert rendered == render_prompt(processor, question, kind)
    assert json.dumps(sent).count("data:image/png;base64,") == 1


# ---------------------------------------------------------------- a model that plain transformers uses correctly
SERVABLE_FILES = ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
                  "chat_template.jinja", IMAGE_SETTINGS_FILE, CARD_FILE)  # fmt: skip
README_INPUTS = 'model_dir, image_path, question = "./outputs/merged", "photo.jpg", "where is the red sign?"'


def readme_snippet() -> str:
    """The plain-transformers example in README.md's Serve section, as written there."""
    with open(os.path.join(REPO_DIR, "README.md"), encoding="utf-8") as f:
        section = f.read().split("### Serve\n", 1)[1]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("\n```", start)]


def run_readme_snippet(model_dir, row, cwd):
    """The snippet on one test row, in a fresh interpreter that cannot import any file of this repo."""
    code = readme_snippet()
    assert README_INPUTS in code and PROMPT_SUFFIX in code  # the snippet's prompt is training's
    inputs = f"model_dir, image_path, question = {str(model_dir)!r}, {row['image'][0]!r}, {row['user']!r}"
    code = code.replace(README_INPUTS, inputs)
    repo_modules = ("utils", "answers", "scoring", "generation", "model_families")
    no_repo = f"import importlib.util\nassert not any(importlib.util.find_spec(m) for m in {repo_modules})\n"
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    command = [sys.executable, "-I", "-c", no_repo + code]  # -I: neither PYTHONPATH nor the working dir on the path
    result = subprocess.run(command, cwd=cwd, env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_box_equal(snippet_box, infer_box):
    """Both round to 2 decimals after the same scaling written in another order: at most one unit of rounding apart."""
    assert infer_box is not None
    assert all(abs(a - b) <= 0.0101 for a, b in zip(snippet_box, infer_box)), (snippet_box, infer_box)


def check_self_contained(directory, base_model):
    missing = [name for name in SERVABLE_FILES if not os.path.isfile(os.path.join(directory, name))]
    assert not missing, f"{directory} lacks {missing}"
    metadata = card_metadata(directory)
    assert metadata["base_model"] == str(base_model) and metadata["pipeline_tag"] == "image-text-to-text"
    with open(os.path.join(directory, CARD_FILE), encoding="utf-8") as f:
        card = f.read()
    settings = ImageSettings.load(directory)
    assert PROMPT_SUFFIX in card and f"longer side is {settings.max_image_side} px" in card
    assert ("0-1000" in card) == (settings.coordinate_system == "model_frame_0_1000")
    assert "transformers serve" in card
    return metadata


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_final_save_and_checkpoints_are_self_contained(family, trained_models, tiny_model_dir, tiny_qwen3_vl_dir):
    base = {"qwen2_5_vl": tiny_model_dir, "qwen3_vl": tiny_qwen3_vl_dir}[family]
    checkpoint = os.path.join(trained_models[family], f"checkpoint-{ANSWERING_STEPS}")
    for directory in (trained_models[family], checkpoint):
        metadata = check_self_contained(directory, base)
        assert metadata["datasets"][0].endswith("first4.jsonl") and metadata["tags"][1] == family


def test_readme_snippet_reads_qwen3_vl_answers_as_infer_does(trained_models, data_dir, tmp_path):
    model_dir, row = trained_models["qwen3_vl"], load_sft_jsonl(data_dir / "test.jsonl")[0]
    test_set = ["--model_name_or_path", model_dir, "--test_dataset_name", data_dir / "test.jsonl", "--limit", 1]
    _, (predicted,), _ = infer_cli(*test_set, "--batch_size", 1, output_dir=tmp_path / "eval")
    check_box_equal(run_readme_snippet(model_dir, row, tmp_path), predicted["pred_bbox"])


def test_merged_model_is_self_contained_and_plain_transformers_predicts_infers_box(trained_models, data_dir, tmp_path):
    """A LoRA run with an evaluation, merged: the merged dir carries everything, its card the adapter's dataset
    and last evaluation, and the README snippet (no file of this repo importable) gives infer.py's box."""
    base = trained_models["qwen2_5_vl"]
    lora = ["--use_lora", "true", "--r", 8, "--lora_alpha", 16, "--target_modules", "q_proj", "v_proj"]
    evaluation = ["--eval_strategy", "steps", "--eval_steps", 10, "--test_dataset_name", data_dir / "last4.jsonl"]
    adapter = train(base, data_dir / "last4.jsonl", tmp_path / "lora", *lora, *evaluation, "--max_steps", 10)
    assert card_metadata(adapter)["library_name"] == "peft"
    merged = tmp_path / "merged"
    run_script("scripts/merge_model.py", "--base_model", base, "--adapter", adapter, "--output_dir", merged)
    metadata = check_self_contained(merged, base)
    assert metadata["datasets"][0].endswith("last4.jsonl")
    (result,) = metadata["model-index"][0]["results"]
    assert {"eval_loss"} <= {metric["type"] for metric in result["metrics"]}

    row = load_sft_jsonl(data_dir / "test.jsonl")[0]
    test_set = ["--model_name_or_path", merged, "--test_dataset_name", data_dir / "test.jsonl", "--limit", 1]
    _, (predicted,), _ = infer_cli(*test_set, "--batch_size", 1, output_dir=tmp_path / "eval")
    check_box_equal(run_readme_snippet(merged, row, tmp_path), predicted["pred_bbox"])


def test_benchmark_serving_reports_hf_and_the_server_side_by_side(tiny_model_dir, data_dir, tmp_path):
    result = run_script(
        "scripts/benchmark_serving.py", "--model_name_or_path", tiny_model_dir, "--test_dataset_name",
        data_dir / "test.jsonl", "--limit", 3, "--batch_sizes", 1, 2, "--concurrency", 1, 2, "--max_new_tokens", 3,
        "--server_log", tmp_path / "server.log", env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    table = [line for line in result.stdout.splitlines() if line.startswith(("| HF generate", "| served"))]
    assert [line.split(" | ")[:2] for line in table] == [
        ["| HF generate", "batch 1"], ["| HF generate", "batch 2"],
        ["| served (transformers serve)", "concurrency 1"], ["| served (transformers serve)", "concurrency 2"],
    ], result.stdout  # fmt: skip
    assert all(float(line.split(" | ")[2]) > 0 for line in table)
    assert all(line.endswith("| 3/3 |") for line in table[2:])  # the server answers as HF batch 1


def test_a_partial_run_resumes_only_with_the_same_backend(processor, data_dir, tmp_path):
    settings = ImageSettings.from_processor(processor, 56, FAMILIES["qwen2_5_vl"])
    common = {"test_dataset_name": str(data_dir / "test.jsonl"), "model_name_or_path": "m", "adapter": None,
              "limit": None, "batch_size": 4, "max_new_tokens": 24, "dtype": "auto",
              "use_checkpoint_generation_config": False, "confidence_rule": "coarse"}  # fmt: skip

    def fingerprint(backend="openai", base_url="http://127.0.0.1:8000/v1", served_model="served"):
        args = argparse.Namespace(**common, backend=backend, base_url=base_url, server_logprobs=False)
        return infer.run_fingerprint(args, settings, served_model)

    infer.open_partial_file(tmp_path, 0, fingerprint()).close()
    assert infer.read_partial_runs(tmp_path, fingerprint()) == {}  # the same backend resumes
    others = (fingerprint(backend="hf"), fingerprint(base_url="http://elsewhere/v1"), fingerprint(served_model="x"))
    for other in others:
        with pytest.raises(ValueError, match="changed: backend"):
            infer.read_partial_runs(tmp_path, other)
