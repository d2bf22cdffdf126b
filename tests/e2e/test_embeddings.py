"""Governed embeddings, end to end: the official clients against Charter, a dev node
serving the tiny embedding model as TEI does, and the node's own vectors and counters as
the truth.

Processes on 127.0.0.1: a dev node registered as a `tei` engine, and Charter under
`charter serve`. The openai client's `embeddings.create` (its default base64 encoding and
floats) and huggingface_hub's `feature_extraction` (which posts to its base URL) run
unchanged; a generation request to the embedding model is refused in the caller's
protocol and audited.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.sites import Site, governed_site
from tests.e2e.test_gateway import wait_events

TEXTS = ["Charter governs which open models may serve requests.",
         "The audit log is append-only."]


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from charter.devnode.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("embed") / "model", task="embedding")


@pytest.fixture
def site(embed_dir, configured, make_person, tmp_path) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    with governed_site(embed_dir, configured, make_person, tmp_path,
                       name="charter-tiny-embed", serving="embed", engine="tei") as found:
        yield found


def prompt_tokens(node: str) -> int:
    text = httpx.get(f"{node}/metrics", timeout=10).text
    return int(float(re.search(r"^charter_devnode_prompt_tokens_total (\S+)$", text,
                               re.M).group(1)))  # type: ignore[union-attr]


def test_embeddings_through_the_official_clients_are_governed(site, embed_dir) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import InferenceClient
    from openai import OpenAI
    from transformers import AutoTokenizer

    from charter.registry import service as registry

    assert registry.get_version(site.version_id).task == "embedding"  # from the card
    truth = httpx.post(f"{site.node}/embed", json={"inputs": TEXTS}, timeout=30).json()
    before = prompt_tokens(site.node)

    client = OpenAI(base_url=f"{site.charter}/v1", api_key=site.key)
    answer = client.embeddings.create(model="embed", input=TEXTS)  # base64 by default
    assert answer.model == "embed" and [d.index for d in answer.data] == [0, 1]
    for got, want in zip(answer.data, truth, strict=True):
        assert got.embedding == pytest.approx(want, abs=1e-6)
    floats = client.embeddings.create(model="embed", input=TEXTS[0], encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(truth[0], abs=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(str(embed_dir), local_files_only=True)
    counts = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    assert answer.usage.prompt_tokens == sum(counts)

    tei = InferenceClient(base_url=f"{site.charter}/tei/embed", api_key=site.key)
    vector = tei.feature_extraction(TEXTS[1])
    assert vector.shape == (1, 64) and list(vector[0]) == pytest.approx(truth[1], abs=1e-6)
    via_tgi = InferenceClient(base_url=f"{site.charter}/tgi/embed", api_key=site.key)
    assert list(via_tgi.feature_extraction(TEXTS[0])[0]) == pytest.approx(truth[0], abs=1e-6)
    h = {"Authorization": f"Bearer {site.key}", "X-Charter-Model": "embed"}
    for route in ("tei", "tgi"):
        info = httpx.get(f"{site.charter}/{route}/embed/info", headers=h, timeout=30).json()
        assert info["model_pipeline_tag"] == "feature-extraction"
    r = httpx.post(f"{site.charter}/embed", headers=h, json={"inputs": TEXTS,
                                                            "normalize": False}, timeout=30)
    assert r.status_code == 200 and len(r.json()) == 2
    assert r.headers["X-Charter-Decision-Id"]

    outcomes = wait_events("dispatch.outcome", 5)
    assert [(o.details["tokens_in"], o.details["tokens_out"]) for o in outcomes] == [
        (sum(counts), 0), (counts[0], 0), (counts[1], 0), (counts[0], 0), (sum(counts), 0)]
    assert all(o.details["tokens_estimated"] is False for o in outcomes)
    assert prompt_tokens(site.node) - before == 2 * sum(counts) + 2 * counts[0] + counts[1]

    # a generation request to an embedding model, in each caller's protocol, audited
    r = httpx.post(f"{site.charter}/v1/chat/completions", headers=h, timeout=30, json={
        "model": "embed", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "model_task_mismatch"
    assert error["message"] == ("the model 'embed' is an embedding model: it serves embeddings "
                                "(POST /v1/embeddings, TEI's /embed), not text generation "
                                "(chat, completions, TGI's generate)")
    r = httpx.post(f"{site.charter}/tgi/embed/generate", headers=h, timeout=30,
                   json={"inputs": "hi"})
    assert r.status_code == 422 and r.json()["error_type"] == "model_task_mismatch"
    refused = wait_events("dispatch.refused", 2)
    assert [e.details["code"] for e in refused] == ["model_task_mismatch"] * 2
    assert refused[0].details["model_task"] == "embedding"

    totals = httpx.get(f"{site.charter}/api/v1/usage", timeout=30, headers={
        "Authorization": f"Bearer {site.admin}"}).json()["totals"]
    assert totals["tokens_in"] == 2 * sum(counts) + 2 * counts[0] + counts[1]
    assert totals["tokens_out"] == 0 and totals["requests"] == 5


def test_a_batch_of_embeddings_runs_through_the_governed_path(site) -> None:  # type: ignore[no-untyped-def]
    """OpenAI's batch API with endpoint /v1/embeddings: each line decided, sent to the
    node, answered with its vector, counted as input tokens."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{site.charter}/v1", api_key=site.key)
    lines = [{"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "embed", "input": text}} for i, text in enumerate(TEXTS)]
    uploaded = client.files.create(
        file=("in.jsonl", "\n".join(json.dumps(x) for x in lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                  completion_window="24h")
    deadline = time.monotonic() + 60
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 2, batch
    assert batch.output_file_id is not None
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    truth = httpx.post(f"{site.node}/embed", json={"inputs": TEXTS}, timeout=30).json()
    by_id = {o["custom_id"]: o["response"]["body"] for o in out}
    for i in range(2):
        body = by_id[f"doc-{i}"]
        assert body["model"] == "embed"
        assert body["data"][0]["embedding"] == pytest.approx(truth[i], abs=1e-6)
    outcomes = wait_events("dispatch.outcome", 2)
    assert {o.details["custom_id"] for o in outcomes} == {"doc-0", "doc-1"}
    assert all(o.details["tokens_in"] > 0 and o.details["tokens_out"] == 0 for o in outcomes)
