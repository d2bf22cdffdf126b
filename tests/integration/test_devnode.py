"""The dev inference node as a real process, driven by the real TGI and OpenAI clients."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError
from openai import OpenAI

from charter.devnode.server import create_node_app
from charter.devnode.tinymodel import build_tiny_model
from charter.registry.importer import content_revision
from tests.processes import free_port, wait_until_up
from tests.tgi_schema import tgi_validator

REPO = Path(__file__).resolve().parents[2]
CHARTER = Path(sys.executable).parent / "charter"
FINISH = {"length", "eos_token", "stop_sequence"}
PROMPT = "The quick brown fox"
Validate = Callable[[str, Any], None]


@dataclass(frozen=True)
class Node:
    url: str
    model: Path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    model = build_tiny_model(tmp_path_factory.mktemp("tiny") / "charter-tiny-llama")
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
        yield Node(url, model)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def validate() -> Validate:
    return tgi_validator()


def _events(response: httpx.Response) -> list[Any]:
    """Parse an SSE body strictly: every event is exactly `data: ...` and a blank line."""
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.read().decode()
    assert body.endswith("\n\n")
    out = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block.removeprefix("data: ")
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def _post_stream(url: str, body: dict[str, Any]) -> list[Any]:
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200
        return _events(response)


def test_the_schema_check_can_fail(validate: Validate) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate("StreamResponse", {"index": 1, "token": {"id": 3, "text": "x"}})
    with pytest.raises(jsonschema.ValidationError):
        validate("Details", {"finish_reason": "stop", "generated_tokens": 1, "prefill": [],
                             "tokens": []})
    validate("StreamResponse", {"index": 1, "token": {"id": 3, "text": "x", "logprob": None,
                                                      "special": False},
                                "generated_text": None, "details": None})


def test_health_and_info_pin_the_model(node: Node, validate: Validate) -> None:
    assert httpx.get(f"{node.url}/health").status_code == 200
    info = httpx.get(f"{node.url}/info").json()
    validate("Info", info)
    assert info["model_id"] == "charter-tiny-llama"
    assert info["model_sha"] == content_revision(node.model)
    assert info["model_pipeline_tag"] == "text-generation"
    assert info["region"] == "eu-west"
    assert info["max_input_tokens"] < info["max_total_tokens"] == 512


def test_model_id_and_revision_flags(node: Node) -> None:
    app = create_node_app(node.model, region="x", model_id="tiny/pinned", revision="abc123")
    info = app.test_client().get("/info").get_json()
    assert (info["model_id"], info["model_sha"], info["region"]) == ("tiny/pinned", "abc123", "x")


def test_inference_client_text_generation(node: Node) -> None:
    client = InferenceClient(base_url=node.url)
    text = client.text_generation(PROMPT, max_new_tokens=8)
    assert isinstance(text, str) and text

    detailed = client.text_generation(PROMPT, max_new_tokens=8, details=True)
    assert detailed.generated_text == text  # greedy: the same answer every time
    assert detailed.details.finish_reason in FINISH
    assert 1 <= detailed.details.generated_tokens == len(detailed.details.tokens) <= 8

    pieces = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True))
    assert all(isinstance(p, str) for p in pieces) and 1 <= len(pieces) <= 8

    events = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True, details=True))
    assert events[-1].generated_text == text
    assert events[-1].details.finish_reason in FINISH
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert "".join(e.token.text for e in events if not e.token.special) == text


def test_inference_client_chat_completion(node: Node) -> None:
    client = InferenceClient(base_url=node.url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = client.chat_completion(messages, max_tokens=8, temperature=0)
    content = out.choices[0].message.content
    assert isinstance(content, str)
    assert out.choices[0].finish_reason in {"stop", "length"}
    assert out.usage.completion_tokens <= 8

    chunks = list(client.chat_completion(messages, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_openai_client(node: Node) -> None:
    client = OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0)
    messages: Any = [{"role": "user", "content": "Say something"}]
    out = client.chat.completions.create(model="charter-tiny-llama", messages=messages,
                                         max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.model == "charter-tiny-llama"
    content = out.choices[0].message.content
    assert isinstance(content, str)
    assert out.usage is not None and out.usage.completion_tokens <= 8

    stream = client.chat.completions.create(model="charter-tiny-llama", messages=messages,
                                            max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

    legacy = client.completions.create(model="charter-tiny-llama", prompt=PROMPT,
                                       max_tokens=5, temperature=0)
    assert legacy.choices[0].finish_reason in {"stop", "length"}
    streamed = list(client.completions.create(model="charter-tiny-llama", prompt=PROMPT,
                                              max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == legacy.choices[0].text
    assert [m.id for m in client.models.list()] == ["charter-tiny-llama"]


def test_tgi_routes_answer_the_spec_shapes(node: Node, validate: Validate) -> None:
    params = {"max_new_tokens": 6, "details": True}
    generate = httpx.post(f"{node.url}/generate", json={"inputs": PROMPT, "parameters": params})
    assert generate.status_code == 200
    validate("GenerateResponse", generate.json())
    assert generate.json()["details"]["finish_reason"] in FINISH

    compat = httpx.post(f"{node.url}/", json={"inputs": PROMPT, "parameters": params,
                                               "stream": False})
    assert compat.status_code == 200 and isinstance(compat.json(), list)
    for item in compat.json():
        validate("GenerateResponse", item)
    assert compat.json()[0]["generated_text"] == generate.json()["generated_text"]

    for route, body in (("/generate_stream", {"inputs": PROMPT, "parameters": params}),
                        ("/", {"inputs": PROMPT, "parameters": params, "stream": True})):
        events = _post_stream(f"{node.url}{route}", body)
        for event in events:
            validate("StreamResponse", event)
        assert [e["index"] for e in events] == list(range(1, len(events) + 1))
        assert all(e["generated_text"] is None for e in events[:-1])
        assert events[-1]["details"]["finish_reason"] in FINISH
        assert events[-1]["generated_text"] == generate.json()["generated_text"]

    tokens = httpx.post(f"{node.url}/tokenize", json={"inputs": PROMPT}).json()
    validate("TokenizeResponse", tokens)
    assert "".join(t["text"] for t in tokens) == PROMPT


def test_openai_routes_answer_the_spec_shapes(node: Node, validate: Validate) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    chat = httpx.post(f"{node.url}/v1/chat/completions", json=body)
    validate("ChatCompletion", chat.json())
    events = _post_stream(f"{node.url}/v1/chat/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1  # `_events` checks the bytes
    for chunk in events[:-1]:
        validate("ChatCompletionChunk", chunk)
    completion = httpx.post(f"{node.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    validate("CompletionFinal", completion.json())


@pytest.mark.parametrize(("route", "body", "field"), [
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": -1}}, "max_new_tokens"),
    ("/generate", {"parameters": {"max_new_tokens": 4}}, "inputs"),
    ("/", {"inputs": "x", "parameters": {"max_new_tokens": 100_000}}, "max_new_tokens"),
    ("/", {"inputs": "x", "stream": True, "parameters": {"stop": list("abcde")}}, "stop"),
    ("/generate_stream", {"inputs": "x", "parameters": {"temperature": 0}}, "temperature"),
    ("/generate_stream", {"inputs": "x", "parameters": {"top_p": 1.5}}, "top_p"),
    ("/generate", {"inputs": "x " * 600}, "inputs"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
])
def test_bad_requests_answer_422_in_tgi_shape(node: Node, validate: Validate, route: str,
                                              body: dict[str, Any], field: str) -> None:
    response = httpx.post(f"{node.url}{route}", json=body)
    assert response.status_code == 422
    validate("ErrorResponse", response.json())
    assert response.json()["error_type"] == "validation"
    assert f"`{field}`" in response.json()["error"]


def test_validation_names_every_bad_field_and_clients_raise(node: Node) -> None:
    response = httpx.post(f"{node.url}/generate", content=b"{not json")
    assert response.status_code == 422 and response.json()["error_type"] == "validation"
    response = httpx.post(f"{node.url}/generate", json={
        "inputs": "x", "parameters": {"max_new_tokens": "8", "temperature": -1, "seed": -2}})
    assert re.findall(r"`(\w+)`", response.json()["error"]) == [
        "temperature", "max_new_tokens", "seed"]
    client = InferenceClient(base_url=node.url)
    with pytest.raises(ValidationError):
        client.text_generation(PROMPT, max_new_tokens=100_000)
    with pytest.raises(ValidationError):
        list(client.text_generation(PROMPT, max_new_tokens=100_000, stream=True))


def test_stop_sequences_full_text_and_seeds(node: Node) -> None:
    def generate(**params: Any) -> dict[str, Any]:
        body = {"inputs": PROMPT, "parameters": {"details": True, **params}}
        response = httpx.post(f"{node.url}/generate", json=body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    free = generate(max_new_tokens=16)
    assert free["details"]["finish_reason"] == "length"
    stop = free["generated_text"][:2]
    assert stop.isprintable() and "\ufffd" not in stop  # the tiny model's greedy answer
    stopped = generate(max_new_tokens=16, stop=[stop])
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"].endswith(stop)
    assert stopped["details"]["generated_tokens"] < 16

    full = generate(max_new_tokens=4, return_full_text=True)
    assert full["generated_text"] == PROMPT + generate(max_new_tokens=4)["generated_text"]

    first = generate(max_new_tokens=12, do_sample=True, seed=7, top_k=50, top_p=0.9)
    again = generate(max_new_tokens=12, do_sample=True, seed=7, top_k=50, top_p=0.9)
    assert first == again and first["details"]["seed"] == 7
    assert generate(max_new_tokens=4, temperature=0.7)["details"]["seed"] is not None


def test_two_concurrent_streams_both_complete(node: Node) -> None:
    results: dict[int, list[Any]] = {}
    start = threading.Barrier(2)

    def stream(n: int) -> None:
        start.wait()
        results[n] = _post_stream(f"{node.url}/generate_stream", {
            "inputs": f"{PROMPT} {n}", "parameters": {"max_new_tokens": 48, "details": True}})

    threads = [threading.Thread(target=stream, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [0, 1]
    for events in results.values():
        final = events[-1]["details"]
        assert final["finish_reason"] in FINISH
        assert final["generated_tokens"] == len(events)


def _metric(node: Node, name: str) -> float:
    text = httpx.get(f"{node.url}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def test_a_client_gone_mid_stream_cancels_its_generation(node: Node) -> None:
    before = _metric(node, "charter_devnode_generated_tokens_total")
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 500}}
    with httpx.stream("POST", f"{node.url}/generate_stream", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break
    deadline = time.monotonic() + 30
    while _metric(node, "charter_devnode_queue_depth") and time.monotonic() < deadline:
        time.sleep(0.05)
    # A finished generation would have counted its 500 tokens; a cancelled one counts none.
    assert _metric(node, "charter_devnode_generated_tokens_total") == before
    answer = httpx.post(f"{node.url}/generate",
                        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    assert answer.status_code == 200


def test_metrics_count_requests(node: Node) -> None:
    httpx.post(f"{node.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    text = httpx.get(f"{node.url}/metrics").text
    assert re.search(r'^charter_devnode_requests_total\{route="generate",status="200"\} [1-9]',
                     text, re.MULTILINE)
    assert _metric(node, "charter_devnode_prompt_tokens_total") > 0
