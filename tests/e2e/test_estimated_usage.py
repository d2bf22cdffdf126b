"""A node that reports no token counts: Charter counts them with the version's own
tokenizer, offline, and marks them estimated everywhere they go.

Processes on 127.0.0.1: a dev node started with `--no-counts` (no OpenAI usage even when
asked, no TGI details or count headers, like some engines), and Charter under `charter
serve` with CHARTER_TOKENIZERS_DIR holding the version's tokenizer files. The node's own
Prometheus counters are the truth the estimates are held to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.sites import Site, governed_site
from tests.e2e.test_gateway import wait_events


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from charter.devnode.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def site(model_dir, configured, make_person, tmp_path) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    with governed_site(model_dir, configured, make_person, tmp_path, counts=False) as found:
        yield found


def node_counts(node: str) -> tuple[int, int]:
    """What the node itself counted (its Prometheus counters): prompt and generated."""
    text = httpx.get(f"{node}/metrics", timeout=10).text
    found = dict(re.findall(r"^charter_devnode_(prompt|generated)_tokens_total (\S+)$", text,
                            re.M))
    return int(float(found["prompt"])), int(float(found["generated"]))


def test_a_node_without_counts_is_counted_with_the_versions_tokenizer(
        site, model_dir) -> None:  # type: ignore[no-untyped-def]
    """Every protocol, streams and not: the outcome holds Charter's count, made with the
    version's tokenizer, marked estimated; the prompt's count is the node's own figure;
    the usage API shows the estimated part; the caller receives what the node sent."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    client = OpenAI(base_url=f"{site.charter}/v1", api_key=site.key)
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}],
           "max_tokens": 6, "temperature": 0}
    whole = client.chat.completions.create(**ask)
    assert whole.usage is None  # the node reported none, and Charter adds none
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    h = {"Authorization": f"Bearer {site.key}"}
    tgi = {"inputs": "The audit log", "parameters": {"max_new_tokens": 5}}
    r = httpx.post(f"{site.charter}/tgi/tiny/generate", headers=h, json=tgi, timeout=30)
    assert r.status_code == 200 and "x-generated-tokens" not in r.headers
    with httpx.stream("POST", f"{site.charter}/tgi/tiny/generate_stream", headers=h,
                      json=tgi, timeout=30) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert events and all(e["details"] is None for e in events)

    outcomes = wait_events("dispatch.outcome", 4)
    got = [(o.details["tokens_in"], o.details["tokens_out"], o.details["tokens_estimated"],
            o.details.get("estimated_by")) for o in outcomes]

    def out(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    chat_in = len(tokenizer("user: Hello there\nassistant:")["input_ids"])
    tgi_in = len(tokenizer("The audit log")["input_ids"])
    content = whole.choices[0].message.content or ""
    assert got[0] == (chat_in, out(content), True, "tokenizer")
    assert got[1] == (chat_in, out(streamed), True, "tokenizer")
    assert got[2] == (tgi_in, out(r.json()["generated_text"]), True, "tokenizer")
    assert got[3] == (tgi_in, len(events), True, "tokenizer")  # one event per token
    # The prompts' counts are the node's own figure exactly; the answers' within what
    # re-reading text can differ by (a special token generated is not in the text).
    prompt, generated = node_counts(site.node)
    assert prompt == 2 * chat_in + 2 * tgi_in
    assert abs(generated - sum(g[1] for g in got)) <= 4, (generated, got)

    admin = {"Authorization": f"Bearer {site.admin}"}
    report = httpx.get(f"{site.charter}/api/v1/usage", headers=admin, timeout=10).json()
    totals = report["totals"]
    assert totals["requests"] == 4
    assert totals["tokens_in"] == prompt and totals["tokens_estimated"] == (
        totals["tokens_in"] + totals["tokens_out"])
    metrics = httpx.get(f"{site.charter}/metrics", timeout=10).text
    found = re.search(r'^charter_tokens_estimated_total\{estimator="tokenizer"\} (\S+)$',
                      metrics, re.M)
    assert found and int(float(found.group(1))) == totals["tokens_estimated"], metrics[:2000]
