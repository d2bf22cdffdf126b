"""What the dispatch policy obliges once it has seen a request's findings: replace them
before the request is sent (the caller told so), replace them in the answer (whole or as
it streams), or send the request only to a region that meets a stricter residency. Each
through the gateway against a real HTTP node that echoes what it was sent; audited with
types and counts, never the text."""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from charter.audit.service import EventFilter, list_events
from tests.batch_support import BatchWorld, FakeNode, make_world, to_jsonl

ROOT = Path(__file__).resolve().parents[2]
CARD = "4111 1111 1111 1111"
IBAN = "DE89 3704 0044 0532 0130 00"
SECRETS = ["AWS_ACCESS_KEY", "CHARTER_API_KEY", "GITHUB_TOKEN", "GOOGLE_API_KEY",
           "OPENAI_API_KEY", "PRIVATE_KEY", "SLACK_TOKEN"]


def _policies(tmp_path: Path, **changes: Any) -> str:
    """The bundled policies with internal data inspected, and `changes` to inspection.json."""
    target = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", target)
    path = target / "data" / "inspection.json"
    data = json.loads(path.read_text())
    data["inspect"]["data_classes"] = ["internal"]
    data.update(changes)
    path.write_text(json.dumps(data))
    return str(target)


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": text}],
            **extra}


def _events(action: str) -> list[Any]:
    from tests.runtimes import flush_outcomes

    assert flush_outcomes()  # outcomes are written after the answer
    return list_events(EventFilter(action=action, limit=1000))


def _client(world: BatchWorld) -> Any:
    from tests.runtimes import app_for

    return app_for(world.settings).test_client()


@pytest.fixture
def world(configured, make_person, tmp_path) -> Iterator[BatchWorld]:  # type: ignore[no-untyped-def]
    """The bundled data: internal requests have e-mail and IP addresses replaced."""
    w = make_world(configured, make_person, policy_dir=_policies(tmp_path))
    yield w
    w.node.stop()


def test_findings_are_replaced_before_the_request_is_sent(world) -> None:  # type: ignore[no-untyped-def]
    client = _client(world)
    r = client.post("/v1/chat/completions", headers=world.headers, json=_chat(
        "write to jane.doe@example.com from 10.1.2.3, and to j@example.org"))
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.headers["X-Charter-Redacted"] == "EMAIL_ADDRESS=2, IP_ADDRESS=1"
    sent = world.node.bodies[-1][1]["messages"][0]["content"]
    assert sent == "write to <EMAIL_ADDRESS> from <IP_ADDRESS>, and to <EMAIL_ADDRESS>"
    assert r.get_json()["choices"][0]["message"]["content"] == f"echo: {sent}"
    decision = _events("policy.decide")[-1]
    assert decision.details["findings"] == {"EMAIL_ADDRESS": 2, "IP_ADDRESS": 1}
    assert decision.details["obligations"] == {
        "redact": ["EMAIL_ADDRESS", "IP_ADDRESS"],
        "redact_response": sorted(["CREDIT_CARD", *SECRETS])}
    outcome = _events("dispatch.outcome")[-1]
    assert outcome.details["redacted"] == {"EMAIL_ADDRESS": 2, "IP_ADDRESS": 1}
    assert outcome.details["request_digest"].startswith("sha256:")  # of what the caller sent
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'charter_inspection_redactions_total{type="EMAIL_ADDRESS"} 2.0' in metrics

    # TGI's inputs, a streamed chat (told before the first byte), completion prompts
    r = client.post("/tgi/m/generate", headers=world.headers,
                    json={"inputs": "ping 192.168.0.1", "parameters": {}})
    assert r.status_code == 200 and r.headers["X-Charter-Redacted"] == "IP_ADDRESS=1"
    assert world.node.bodies[-1] == ("/generate", {"inputs": "ping <IP_ADDRESS>",
                                                   "parameters": {}})
    assert r.get_json() == {"generated_text": "echo: ping <IP_ADDRESS>"}
    r = client.post("/v1/chat/completions", headers=world.headers,
                    json=_chat("mail jane@example.com", stream=True))
    assert r.status_code == 200 and r.headers["X-Charter-Redacted"] == "EMAIL_ADDRESS=1"
    assert b"jane@example.com" not in r.get_data()
    r = client.post("/v1/completions", headers=world.headers,
                    json={"model": "m", "prompt": ["a@example.com", "b"], "max_tokens": 2})
    assert r.status_code == 200 and world.node.bodies[-1][1]["prompt"] == [
        "<EMAIL_ADDRESS>", "b"]
    # nothing to replace: nothing said, the body sent as it came
    r = client.post("/v1/chat/completions", headers=world.headers, json=_chat("hello"))
    assert "X-Charter-Redacted" not in r.headers
    assert "redacted" not in _events("dispatch.outcome")[-1].details


def test_a_finding_that_cannot_be_replaced_refuses_the_request(world) -> None:  # type: ignore[no-untyped-def]
    """An address split across two text parts is found (the parts are inspected joined)
    but is in neither part alone: it would be sent, so the request is refused."""
    client = _client(world)
    sent_before = len(world.node.bodies)
    r = client.post("/v1/chat/completions", headers=world.headers, json={
        "model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "mail jane.doe@exa"},
            {"type": "text", "text": "mple.com please"}]}]})
    assert r.status_code == 400, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == "redaction_incomplete"
    assert "EMAIL_ADDRESS" in error["message"]
    refused = _events("dispatch.refused")[-1]
    assert refused.details["code"] == "redaction_incomplete"
    assert refused.details["types"] == ["EMAIL_ADDRESS"]
    assert len(world.node.bodies) == sent_before


@pytest.fixture
def answers(configured, make_person, tmp_path) -> Iterator[BatchWorld]:  # type: ignore[no-untyped-def]
    """Internal requests may carry card numbers; answers have theirs replaced."""
    data = json.loads((ROOT / "policies" / "data" / "inspection.json").read_text())
    w = make_world(configured, make_person, policy_dir=_policies(
        tmp_path, deny={**data["deny"], "internal": SECRETS}, redact={},
        responses={"internal": ["CREDIT_CARD"]}))
    yield w
    w.node.stop()


def _sse(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in raw.split(b"\n")
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"]


def test_answers_are_redacted_whole_and_as_they_stream(answers) -> None:  # type: ignore[no-untyped-def]
    client = _client(answers)
    asked = f"card {CARD}, thanks"
    r = client.post("/v1/chat/completions", headers=answers.headers, json=_chat(asked))
    assert r.status_code == 200, r.get_data(as_text=True)
    assert answers.node.bodies[-1][1]["messages"][0]["content"] == asked  # sent as it came
    assert r.get_json()["choices"][0]["message"]["content"] == "echo: card <CREDIT_CARD>, thanks"
    assert r.headers["X-Charter-Response-Redacted"] == "CREDIT_CARD=1"
    assert _events("dispatch.outcome")[-1].details["response_redacted"] == {"CREDIT_CARD": 1}

    # streamed four characters an event: the number arrives split over five of them
    r = client.post("/v1/chat/completions", headers=answers.headers,
                    json=_chat(asked, stream=True))
    raw = r.get_data()
    assert b"4111" not in raw and b"1111" not in raw
    text = "".join(c["delta"].get("content") or "" for e in _sse(raw) for c in e["choices"])
    assert text == "echo: card <CREDIT_CARD>, thanks"
    assert raw.endswith(b"data: [DONE]\n\n")
    assert all("usage" not in e for e in _sse(raw))  # the caller did not ask for it
    outcome = _events("dispatch.outcome")[-1]
    assert outcome.details["response_redacted"] == {"CREDIT_CARD": 1}
    assert outcome.details["tokens_out"] > 0 and outcome.details["stream"] is True

    r = client.post("/tgi/m/generate_stream", headers=answers.headers,
                    json={"inputs": asked, "parameters": {}})
    events = _sse(r.get_data())
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == (
        "echo: card <CREDIT_CARD>, thanks")
    assert events[-1]["generated_text"] == "echo: card <CREDIT_CARD>, thanks"
    assert {e["token"]["id"] for e in events} == {0}
    assert b"4111" not in r.get_data()
    r = client.post("/tgi/m/generate", headers=answers.headers,
                    json={"inputs": asked, "parameters": {}})
    assert r.get_json() == {"generated_text": "echo: card <CREDIT_CARD>, thanks"}
    assert r.headers["X-Charter-Response-Redacted"] == "CREDIT_CARD=1"


def test_an_answer_that_cannot_be_inspected_is_not_passed_on(answers) -> None:  # type: ignore[no-untyped-def]
    from charter.inspection.detect import Detector, InspectionUnavailableError
    from tests.runtimes import app_for

    class Broken(Detector):
        def redact(self, text, types):  # type: ignore[no-untyped-def]
            raise InspectionUnavailableError("the anonymizer broke")

    app = app_for(answers.settings)
    app.extensions["charter.runtime"].part("inspection", lambda rt: Broken())
    client = app.test_client()
    r = client.post("/v1/chat/completions", headers=answers.headers, json=_chat("hi"))
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "inspection_unavailable"
    assert "echo" not in r.get_data(as_text=True)
    outcome = _events("dispatch.outcome")[-1]
    assert (outcome.details["outcome"], outcome.details["status"]) == ("failed", 503)
    r = client.post("/v1/chat/completions", headers=answers.headers,
                    json=_chat("x" * 300, stream=True))
    events = _sse(r.get_data())
    assert events[-1]["error"]["code"] == "node_failed"
    assert "inspection failed" in _events("dispatch.outcome")[-1].details["error"]
    assert "x" * 64 not in r.get_data(as_text=True)


def _version_in(owner: Any, regions: list[str]) -> str:
    """A version approved for `regions`, for real (admission, a second approver)."""
    from charter.actor import SYSTEM
    from charter.db import utcnow
    from charter.registry import service as registry
    from charter.registry.schemas import (
        ApprovalConditions,
        FileSpec,
        ModelCreate,
        Transition,
        VersionSpec,
    )

    model = registry.create_model(owner.actor, ModelCreate(
        name="routed", publisher="TinyLlama", source_repo="x/routed"))
    version = registry.create_version(owner.actor, model.id, VersionSpec(
        label="1", source_revision="a" * 40, weight_format="safetensors",
        files=[FileSpec(path="model.safetensors", size=1, sha256="b" * 64)],
        license_declared="apache-2.0", license_card="apache-2.0", derivation="original",
        datasets=["d"], storage_region="eu-central", hosting_regions=regions))
    registry.submit_version(owner.actor, version.id, Transition())
    registry.approve_version(SYSTEM, version.id, ApprovalConditions.model_validate_json(
        json.dumps({"allowed_regions": regions, "allowed_data_classes": ["internal"],
                    "allowed_purposes": ["assistant"],
                    "expires_at": (utcnow() + timedelta(days=30)).isoformat()})))
    return version.id


def test_a_finding_sends_the_request_only_where_its_residency_allows(world, make_person) -> None:  # type: ignore[no-untyped-def]
    """An IBAN in an internal request is handled as confidential data: of a deployment on
    nodes in eu-north and eu-central it goes only to eu-central; with no node there it is
    refused, naming the rule, and nothing is sent."""
    from charter.actor import SYSTEM
    from charter.nodes import service as nodes

    version_id = _version_in(make_person("steward"), ["eu-central", "eu-north"])
    north, central = (FakeNode("x/routed", "a" * 40).start() for _ in range(2))
    ids = {}
    try:
        for node, region in ((north, "eu-north"), (central, "eu-central")):
            made = nodes.register_node(SYSTEM, world.settings, name=f"r-{region}",
                                       region=region, base_url=node.url, engine="tgi",
                                       labels={}, capacity=8)
            assert nodes.probe_node(world.settings, made.id).attestation == "attested"
            ids[region] = made.id
        nodes.create_deployment(SYSTEM, serving_name="north", version_id=version_id,
                                node_ids=[ids["eu-north"]])
        nodes.create_deployment(SYSTEM, serving_name="routed", version_id=version_id,
                                node_ids=[ids["eu-north"], ids["eu-central"]])
        client = _client(world)
        ask = {**_chat(f"pay to {IBAN}"), "model": "north"}
        r = client.post("/v1/chat/completions", headers=world.headers, json=ask)
        assert r.status_code == 503, r.get_data(as_text=True)
        error = r.get_json()["error"]
        assert error["code"] == "no_node_in_allowed_region"
        assert "handled as confidential data: not in region eu-north" in error["message"]
        assert not north.bodies
        r = client.post("/v1/chat/completions", headers=world.headers,
                        json={**_chat("no account here"), "model": "north"})
        assert r.status_code == 200 and len(north.bodies) == 1

        ask["model"] = "routed"
        for _ in range(4):
            r = client.post("/v1/chat/completions", headers=world.headers, json=ask)
            assert r.status_code == 200, r.get_data(as_text=True)
        assert len(central.bodies) == 4 and len(north.bodies) == 1
        served = _events("policy.decide")[-1]
        assert served.details["findings"] == {"IBAN_CODE": 1} and served.outcome == "success"
    finally:
        north.stop()
        central.stop()


def test_a_batch_line_is_redacted_and_says_so(world) -> None:  # type: ignore[no-untyped-def]
    from charter import scope
    from tests.runtimes import app_for

    app = app_for(world.settings)
    with scope.bound(app.extensions["charter.runtime"]):
        client = app.test_client()
        line = {"custom_id": "l1", "method": "POST", "url": "/v1/chat/completions",
                "body": _chat("reach me at jane@example.com")}
        r = client.post("/v1/files", headers=world.headers, data={
            "purpose": "batch", "file": (io.BytesIO(to_jsonl([line])), "in.jsonl")},
            content_type="multipart/form-data")
        assert r.status_code == 200, r.get_json()
        r = client.post("/v1/batches", headers=world.headers, json={
            "input_file_id": r.get_json()["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})
        assert r.status_code == 200, r.get_json()
        batch_id, deadline = r.get_json()["id"], time.monotonic() + 60
        while (done := client.get(f"/v1/batches/{batch_id}", headers=world.headers)
               .get_json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, done
            time.sleep(0.1)
        out = client.get(f"/v1/files/{done['output_file_id']}/content", headers=world.headers)
        answer = json.loads(out.data.decode().splitlines()[0])["response"]["body"]
    assert answer["charter"] == {"redacted": {"EMAIL_ADDRESS": 1}}
    assert answer["choices"][0]["message"]["content"] == "echo: reach me at <EMAIL_ADDRESS>"
    assert world.node.bodies[-1][1]["messages"][0]["content"] == "reach me at <EMAIL_ADDRESS>"
