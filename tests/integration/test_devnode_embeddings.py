"""The dev node's embeddings (TEI's `/embed` and `POST /`, OpenAI's `/v1/embeddings`) as a
real process, driven by the real huggingface_hub and openai clients."""

from __future__ import annotations

import base64
import math
import os
import re
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from huggingface_hub import InferenceClient
from transformers import AutoTokenizer

from charter.devnode.server import create_node_app
from charter.devnode.tinymodel import build_tiny_model
from charter.registry.importer import content_revision
from tests.processes import free_port, wait_until_up

CHARTER = Path(sys.executable).parent / "charter"
MODEL = "charter-tiny-embed"
HIDDEN = 64  # the tiny model's hidden size
TEXTS = ["Charter governs which open models may serve requests.",
         "The audit log is append-only.", "The quick brown fox"]
LONG = "fox " * 600  # more tokens than the window


@dataclass(frozen=True)
class Node:
    url: str
    model: Path
    tokenizer: Any

    def tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    model = build_tiny_model(tmp_path_factory.mktemp("tiny") / MODEL, task="embedding")
    port, log = free_port(), model.parent / "node.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(CHARTER), "node", "serve", "--model", str(model), "--region", "eu-west",
             "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, f"{url}/health", log, "the node", timeout_s=120)
        yield Node(url, model, AutoTokenizer.from_pretrained(model, local_files_only=True))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _embed(node: Node, **body: Any) -> httpx.Response:
    return httpx.post(f"{node.url}/embed", json=body, timeout=60)


def _vectors(node: Node, texts: list[str]) -> list[list[float]]:
    response = _embed(node, inputs=texts)
    assert response.status_code == 200, response.text
    return list(response.json())


def _norm(vector: Any) -> float:
    return math.sqrt(sum(float(x) ** 2 for x in vector))


def _metric(node: Node, name: str) -> float:
    text = httpx.get(f"{node.url}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def test_info_names_an_embedding_model(node: Node) -> None:
    info = httpx.get(f"{node.url}/info").json()
    assert info["model_id"] == MODEL
    assert info["model_sha"] == content_revision(node.model)
    assert info["model_pipeline_tag"] == "feature-extraction"
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_client_batch_size"] == 32


def test_embed_answers_teis_shape_and_headers(node: Node) -> None:
    single = _embed(node, inputs=TEXTS[0])
    assert single.status_code == 200
    [vector] = single.json()  # one array per input, a single string included
    assert len(vector) == HIDDEN and all(isinstance(x, float) for x in vector)
    assert math.isclose(_norm(vector), 1.0, rel_tol=1e-5)
    assert single.headers["x-compute-type"] == "cpu"
    assert single.headers["x-compute-tokens"] == str(node.tokens(TEXTS[0]))
    assert single.headers["x-compute-characters"] == str(len(TEXTS[0]))

    batch = _embed(node, inputs=TEXTS)
    assert batch.headers["x-compute-tokens"] == str(sum(map(node.tokens, TEXTS)))
    assert batch.json()[0] == vector  # deterministic, and independent of its batch mates
    assert batch.json() == [_vectors(node, [t])[0] for t in TEXTS]  # in the inputs' order
    assert len({tuple(v) for v in batch.json()}) == len(TEXTS)

    raw = _embed(node, inputs=TEXTS[0], normalize=False).json()[0]
    assert _norm(raw) > 1.5
    assert np.allclose(np.array(raw) / _norm(raw), vector, atol=1e-6)


def test_truncation_and_dimensions(node: Node) -> None:
    refused = _embed(node, inputs=LONG)
    assert refused.status_code == 422  # TEI >= 1.9.0; Validation was 413 before it
    assert refused.json() == {"error_type": "Validation", "error": (
        f"Input validation error: `inputs` must have less than 511 tokens. "
        f"Given: {node.tokens(LONG)}")}

    right = _embed(node, inputs=LONG, truncate=True)
    left = _embed(node, inputs=LONG, truncate=True, truncation_direction="Left")
    assert right.status_code == left.status_code == 200
    assert right.headers["x-compute-tokens"] == left.headers["x-compute-tokens"] == "511"
    assert right.json() != left.json()

    short = _embed(node, inputs=TEXTS[0], dimensions=16).json()[0]
    full = _embed(node, inputs=TEXTS[0], normalize=False).json()[0]
    assert len(short) == 16 and math.isclose(_norm(short), 1.0, rel_tol=1e-5)
    assert np.allclose(short, np.array(full[:16]) / _norm(full[:16]), atol=1e-6)


@pytest.mark.parametrize(("body", "status", "error_type", "words"), [
    ({"inputs": ""}, 400, "Empty", "`inputs` cannot be empty"),
    ({"inputs": []}, 400, "Empty", "`inputs` cannot be empty"),
    ({"inputs": ["a", ""]}, 400, "Empty", "`inputs` cannot be empty"),
    ({"inputs": ["a", 1.5]}, 422, "Validation", "`inputs` must be a string"),
    ({"inputs": ["a"] * 33}, 422, "Validation", "batch size 33 > maximum allowed batch size 32"),
    ({"inputs": "a", "prompt_name": "query"}, 422, "Validation", "`default-prompt-name`"),
    ({"inputs": "a", "truncation_direction": "Up"}, 422, "Validation", "`truncation_direction`"),
    ({"inputs": "a", "normalize": "no"}, 422, "Validation", "`normalize` must be a boolean"),
    ({"inputs": "a", "dimensions": 65}, 422, "Validation", "`dimensions` must be"),
])
def test_embed_refusals_in_teis_shape(node: Node, body: dict[str, Any], status: int,
                                      error_type: str, words: str) -> None:
    response = _embed(node, **body)
    assert response.status_code == status
    assert set(response.json()) == {"error", "error_type"}
    assert response.json()["error_type"] == error_type
    assert words in response.json()["error"]


def test_inference_client_feature_extraction_posts_to_the_root(node: Node) -> None:
    def compat_calls() -> float:
        text = httpx.get(f"{node.url}/metrics").text
        found = re.search(r'^charter_devnode_requests_total\{route="compat",status="200"\} (\S+)$',
                          text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    client = InferenceClient(base_url=node.url)
    before = compat_calls()
    one = client.feature_extraction(TEXTS[0])
    assert compat_calls() == before + 1  # `POST /`, TEI's alias of /embed
    assert one.dtype == np.float32 and one.shape == (1, HIDDEN)
    assert one[0].tolist() == _vectors(node, [TEXTS[0]])[0]
    many = client.feature_extraction(TEXTS, normalize=False)
    assert many.shape == (len(TEXTS), HIDDEN) and all(_norm(v) > 1.5 for v in many)
    truncated = client.feature_extraction(LONG, truncate=True, truncation_direction="left")
    assert truncated.shape == (1, HIDDEN)
    # A generation model's `POST /` still generates (test_devnode covers it with its own node).


def test_openai_client_base64_by_default_and_float(node: Node) -> None:
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0)
    packed = client.embeddings.create(model=MODEL, input=TEXTS)  # asks for base64
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert packed.model == floats.model == MODEL and packed.object == "list"
    assert [d.index for d in packed.data] == [0, 1, 2]
    assert [d.embedding for d in packed.data] == [d.embedding for d in floats.data]
    assert [d.embedding for d in floats.data] == _vectors(node, TEXTS)
    assert all(len(d.embedding) == HIDDEN for d in floats.data)
    assert all(math.isclose(_norm(d.embedding), 1.0, rel_tol=1e-5) for d in floats.data)
    tokens = sum(map(node.tokens, TEXTS))
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens

    ids = node.tokenizer(TEXTS[1])["input_ids"]
    by_ids = client.embeddings.create(model=MODEL, input=[ids], encoding_format="float")
    assert by_ids.data[0].embedding == floats.data[1].embedding

    raw = httpx.post(f"{node.url}/v1/embeddings",
                     json={"model": MODEL, "input": TEXTS[0], "encoding_format": "base64"}).json()
    assert set(raw["data"][0]) == {"object", "index", "embedding"}
    data = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{HIDDEN}f", data)) == floats.data[0].embedding


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": ""}, "input", "`input` cannot be empty"),
    ({"input": []}, "input", "`input` cannot be empty"),
    ({"input": ["a"] * 33}, "input", "batch size 33 > maximum allowed batch size 32"),
    ({"input": LONG}, "input", "`input` must have less than 511 tokens"),
    ({"input": [[1, 10_000]]}, "input", "token ids must be in [0, 384)"),
    ({"input": "a", "dimensions": 32}, "dimensions", "does not support matryoshka"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format", "`encoding_format`"),
])
def test_openai_refusals_in_openais_shape(node: Node, body: dict[str, Any], param: str,
                                          words: str) -> None:
    response = httpx.post(f"{node.url}/v1/embeddings", json={"model": MODEL, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert words in error["message"]


def test_openai_client_raises_the_refusal(node: Node) -> None:
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model=MODEL, input=TEXTS[0], dimensions=32)
    assert raised.value.param == "dimensions"


def test_prompt_tokens_counter_counts_embedding_inputs(node: Node) -> None:
    counter = "charter_devnode_prompt_tokens_total"
    before = _metric(node, counter)
    _embed(node, inputs=TEXTS)
    assert _metric(node, counter) == before + sum(map(node.tokens, TEXTS))
    httpx.post(f"{node.url}/v1/embeddings", json={"model": MODEL, "input": TEXTS[0]})
    assert _metric(node, counter) == before + sum(map(node.tokens, TEXTS)) + node.tokens(TEXTS[0])
    _embed(node, inputs=LONG, truncate=True)  # counts what the model read: the window
    assert _metric(node, counter) == (before + sum(map(node.tokens, TEXTS))
                                      + node.tokens(TEXTS[0]) + 511)
    _embed(node, inputs=LONG)  # a refusal reads nothing
    assert _metric(node, counter) == (before + sum(map(node.tokens, TEXTS))
                                      + node.tokens(TEXTS[0]) + 511)


def test_embeddings_queue_with_a_generation(node: Node) -> None:
    done: dict[str, int] = {}

    def generate() -> None:
        body = {"inputs": TEXTS[0], "parameters": {"max_new_tokens": 64}}
        done["generate"] = httpx.post(f"{node.url}/generate", json=body, timeout=60).status_code

    thread = threading.Thread(target=generate)
    thread.start()
    vectors = [_vectors(node, [TEXTS[0]])[0] for _ in range(3)]
    thread.join(60)
    assert done == {"generate": 200}
    assert vectors[0] == vectors[1] == vectors[2]


def test_no_counts_omits_usage_and_the_token_header(node: Node) -> None:
    app = create_node_app(node.model, region="x", counts=False)
    transport = httpx.WSGITransport(app=app)
    with httpx.Client(transport=transport, base_url="http://node") as http:
        embed = http.post("/embed", json={"inputs": TEXTS})
        assert embed.status_code == 200 and "x-compute-tokens" not in embed.headers
        assert embed.headers["x-compute-characters"] == str(sum(map(len, TEXTS)))
        answer = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS}).json()
        assert "usage" not in answer and len(answer["data"]) == len(TEXTS)
        client = openai.OpenAI(base_url="http://node/v1", api_key="x", http_client=http)
        assert len(client.embeddings.create(model=MODEL, input=TEXTS).data) == len(TEXTS)


def test_the_embedding_model_differs_only_where_meant(tmp_path: Path) -> None:
    generation = build_tiny_model(tmp_path / "generation")
    again = build_tiny_model(tmp_path / "again", task="generation", seed=0)
    embedding = build_tiny_model(tmp_path / "embedding", task="embedding")
    same_weights = build_tiny_model(tmp_path / "same", task="embedding", seed=0)
    # The generation model is what it was: seed 0 and its own card, byte for byte.
    assert content_revision(generation) == content_revision(again)
    card = (generation / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "# charter-tiny-llama" in card
    weights = "model.safetensors"
    assert (embedding / weights).read_bytes() != (generation / weights).read_bytes()
    assert (same_weights / weights).read_bytes() == (generation / weights).read_bytes()
    card = (embedding / "README.md").read_text()
    assert "pipeline_tag: feature-extraction" in card and "# charter-tiny-embed" in card
    with pytest.raises(ValueError, match="task"):
        build_tiny_model(tmp_path / "x", task="speech")
