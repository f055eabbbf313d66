"""The OpenAI-protocol backend of infer.py: any server that speaks /v1/chat/completions (transformers serve,
vLLM, SGLang) answers, and everything after the answer is scoring.py's, as for HF generate.

The server must see what HF generate sees: each image is sent already resized to the model frame
(utils.to_model_frame with the trained model's ImageSettings) as a lossless PNG, so the server's own
smart_resize is a no-op; the prompt is answers.build_messages for the row's kind with the image as a data
URL, which the server renders with the model's own chat template (with answers.CHAT_TEMPLATE_KWARGS, as
training did). Answers come back as raw text and go through generation.prediction_from_answer (parse, map
back to original pixels) like the HF backend's; with logprobs=True (vLLM, SGLang: transformers serve
refuses the field) each box also gets its confidence from the returned token log-probabilities.

local_server runs a server command for the tests and scripts/benchmark_serving.py.
"""

import base64
import contextlib
import io
import socket
import subprocess
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed

import openai

from answers import CHAT_TEMPLATE_KWARGS, answer_kind, build_messages
from confidence import DEFAULT_CONFIDENCE_RULE
from generation import failed_prediction, prediction_from_answer
from utils import load_image, to_model_frame


class ServerUnreachable(ConnectionError):
    """No answer from the server at all (down, wrong URL): stop rather than record every sample as failed."""


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless: the server decodes the very pixels HF would see
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_messages(question: str, kind: str, image) -> list[dict]:
    """answers.build_messages with its image placeholder carrying the image: the same chat template text."""
    image_part = {"type": "image_url", "image_url": {"url": png_data_url(image)}}
    return [
        {**message, "content": [image_part if part["type"] == "image" else part for part in message["content"]]}
        for message in build_messages(question, kind)
    ]


class OpenAIBackend:
    """Rows in, prediction records out (generation.predict's), with `concurrency` requests in flight.

    plain_greedy sends temperature 0 and frequency_penalty 0: transformers serve turns frequency_penalty
    into repetition_penalty 1 + it, so it decodes as infer.py's plain greedy does. vLLM and SGLang keep
    the checkpoint's repetition_penalty unless started as docs/serving.md says. Without plain_greedy the
    server's defaults (the checkpoint's generation_config.json) decide.
    """

    def __init__(self, base_url, api_key, served_model, max_new_tokens, concurrency=4, plain_greedy=True,
                 max_retries=3, timeout=300.0, logprobs=False, confidence_rule=DEFAULT_CONFIDENCE_RULE):  # fmt: skip
        self.base_url = base_url
        # openai retries connection errors, 408, 409, 429 and 5xx itself, with exponential backoff.
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=timeout)
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.sampling = {"max_tokens": max_new_tokens, "extra_body": {"chat_template_kwargs": CHAT_TEMPLATE_KWARGS}}
        if logprobs:
            self.sampling["logprobs"] = True
        self.confidence_rule = confidence_rule
        if plain_greedy:
            self.sampling.update(temperature=0.0, frequency_penalty=0.0)
        self.served_model = served_model or self.only_served_model()

    def only_served_model(self) -> str:
        """The one model the server lists (transformers serve MODEL_DIR lists MODEL_DIR); raises ServerUnreachable
        when nothing answers, ValueError when the choice is not clear."""
        try:
            served = [model.id for model in self.client.models.list()]
        except openai.APIConnectionError as error:
            raise ServerUnreachable(
                f"no OpenAI-compatible server answers at {self.base_url} ({error}). Start one (docs/serving.md), "
                "or pass the right --base_url"
            ) from error
        if len(served) != 1:
            raise ValueError(f"{self.base_url} serves {served or 'no model'}: name one with --served_model")
        return served[0]

    def answer(self, question: str, kind: str, image) -> tuple[str, tuple | None]:
        """The answer text, and (token texts, log-probabilities) when the server returned logprobs."""
        response = self.client.chat.completions.create(
            model=self.served_model, messages=chat_messages(question, kind, image), **self.sampling
        )
        choice = response.choices[0]
        tokens = choice.logprobs.content if choice.logprobs is not None else None
        scored_tokens = ([token.token for token in tokens], [token.logprob for token in tokens]) if tokens else None
        return choice.message.content or "", scored_tokens

    def predict_one(self, row, settings) -> dict:
        try:
            original = load_image(row["image"][0])
        except ValueError as error:
            warnings.warn(f"sample left out of the scores: {error}")
            return failed_prediction(error)
        image = to_model_frame(original, settings)
        where, retries = f"{row['image'][0]}: {self.base_url}", f"up to {self.max_retries} retries"
        try:
            kind = answer_kind(row["assistant"])
            text, scored_tokens = self.answer(row["user"], kind, image)
        except openai.APITimeoutError as error:
            return failed_prediction(f"{where} did not answer in time ({retries}): {error}")
        except openai.APIConnectionError as error:
            raise ServerUnreachable(f"{self.base_url} stopped answering ({error})") from error
        except openai.APIError as error:  # the server answered with an error status
            return failed_prediction(f"{where} answered with an error ({retries}): {error}")
        return prediction_from_answer(text, kind, image.size, original.size, settings, scored_tokens, self.confidence_rule)

    def predict(self, rows, settings, progress=None) -> list[dict]:
        """One record per row, in order; `progress` (a tqdm bar) advances as each request finishes."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(self.predict_one, row, settings): index for index, row in enumerate(rows)}
            predictions = [None] * len(rows)
            try:
                for future in as_completed(futures):
                    predictions[futures[future]] = future.result()
                    if progress is not None:
                        progress.update(1)
            except ServerUnreachable:
                for future in futures:
                    future.cancel()
                raise
        return predictions


# ---------------------------------------------------------------- a local server, for the tests and the benchmark
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_server(command, port, log_path, env=None, startup_timeout=300):
    """Run a server command listening on 127.0.0.1:`port` (transformers serve, vllm serve) until the block ends;
    yields its /v1 URL once GET /health answers. Its output goes to log_path, quoted when it fails to start."""
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def failure(why):
        with open(log_path) as f:
            return RuntimeError(f"{' '.join(map(str, command))}: {why}; its log ({log_path}) ends:\n{f.read()[-3000:]}")

    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if server.poll() is not None:
                raise failure(f"exited {server.returncode}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            if time.monotonic() > deadline:
                raise failure(f"not answering after {startup_timeout} s")
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
