"""Serving what was trained: infer.py --backend openai against a real `transformers serve` on CPU (both
families) gives HF generate's boxes; a server that is down or a request that fails is handled."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import httpx2
import openai
import pytest

import backends
import scoring
from conftest import REPO_DIR, infer_command, run_script, train
from utils import ImageSettings, load_sft_jsonl


@pytest.fixture(scope="module")
def trained_models(tiny_model_dir, tiny_qwen3_vl_dir, data_dir, tmp_path_factory):
    """Both tiny families trained briefly on 4 samples (enough to answer in the box format), saving a checkpoint."""
    trained = {}
    for family, base_dir in (("qwen2_5_vl", tiny_model_dir), ("qwen3_vl", tiny_qwen3_vl_dir)):
        output_dir = tmp_path_factory.mktemp(f"served_{family}") / "model"
        trained[family] = train(
            base_dir, data_dir / "first4.jsonl", output_dir, "--max_steps", 60, "--learning_rate", 5e-3,
            "--lr_scheduler_type", "constant", "--save_strategy", "steps", "--save_steps", 60,
        )  # fmt: skip
    return trained


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def transformers_serve(model_dir, log_path, startup_timeout=90):
    """`transformers serve MODEL_DIR` on a free local port, on CPU with one thread; yields its /v1 URL, then stops it."""
    port = free_port()
    command = [os.path.join(os.path.dirname(sys.executable), "transformers"), "serve", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(log_path))
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            assert server.poll() is None, f"transformers serve exited {server.returncode}:\n{open(log_path).read()}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            assert time.monotonic() < deadline, f"transformers serve not up in {startup_timeout} s:\n{open(log_path).read()}"
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def infer(*args, output_dir):
    """infer.py with room for a whole 0-1000 box (Qwen3-VL's digits are one token each here)."""
    result = run_script("infer.py", *args, "--output_dir", output_dir, "--max_new_tokens", 40, env={"OMP_NUM_THREADS": "1"})
    with open(output_dir / "predictions.jsonl") as f:
        predictions = [json.loads(line) for line in f]
    with open(output_dir / "metrics.json") as f:
        return result, predictions, json.load(f)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_served_model_gives_hf_generates_boxes(family, trained_models, data_dir, tmp_path):
    """At batch 1 (no padding) both backends run the same prompt on the same pixels with greedy decoding on
    the same CPU float32 weights: raw answers and boxes must be identical, no tolerance."""
    model_dir = trained_models[family]
    test_set = ["--model_name_or_path", model_dir, "--test_dataset_name", data_dir / "eval.jsonl", "--num_vis", 2]
    _, hf, hf_metrics = infer(*test_set, "--batch_size", 1, output_dir=tmp_path / "hf")
    with transformers_serve(model_dir, tmp_path / "serve.log") as base_url:
        openai_args = ["--backend", "openai", "--base_url", base_url, "--concurrency", 4, "--batch_size", 4]
        result, served, served_metrics = infer(*test_set, *openai_args, output_dir=tmp_path / "served")
    assert [p["raw_output"] for p in served] == [p["raw_output"] for p in hf]
    assert [p["pred_bbox"] for p in served] == [p["pred_bbox"] for p in hf]
    assert sum(p["pred_bbox"] is not None for p in served) >= 4, [p["raw_output"] for p in served]  # real boxes
    assert served_metrics["failed_samples"] == hf_metrics["failed_samples"] == 1  # eval.jsonl's corrupt image
    assert {k: v for k, v in served_metrics.items() if k != "model"} == {k: v for k, v in hf_metrics.items() if k != "model"}
    assert os.path.isfile(tmp_path / "served" / "vis" / "grid.jpg")
    assert "at " + base_url in result.stdout


def test_server_that_is_down_fails_naming_the_url(tiny_model_dir, data_dir, tmp_path):
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
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


def test_request_failing_after_retries_is_a_failed_sample_and_a_lost_server_stops(processor, data_dir):
    from model_families import FAMILIES

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

    from utils import build_messages

    question = "where is the red square?"
    sent = backends.chat_messages(question, Image.new("RGB", (56, 28)))
    rendered = processor.apply_chat_template(
        BaseHandler.get_processor_inputs_from_messages(sent, Modality.VLM), add_generation_prompt=True, tokenize=False
    )
    assert rendered == processor.apply_chat_template(build_messages(question), add_generation_prompt=True)
    assert json.dumps(sent).count("data:image/png;base64,") == 1
