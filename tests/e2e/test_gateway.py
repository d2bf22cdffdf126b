"""The governed path end to end: real clients -> Charter (gunicorn) -> real dev nodes.

Processes on 127.0.0.1: two dev nodes in different regions serving the tiny model, one
serving it under a wrong revision, and Charter itself under `charter serve`. The registry,
approval, team, nodes and deployment are set up through the real services.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from charter.audit.service import EventFilter, list_events, verify_chain
from charter.db import utcnow
from tests.conftest import SECRET

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def start_node(model_dir: Path, region: str, revision: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "charter"), "node", "serve", "--model", str(model_dir), "--region", region,
         "--port", str(port), "--model-id", "charter/tiny-llama", "--revision", revision],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, timeout=120)
    return url, proc


def wait_events(action: str, count: int, timeout: float = 10) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        events = list_events(EventFilter(action=action))
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.1)


@dataclass
class World:
    charter: str
    key: str  # the service account's API key (team "apps")
    admin_key: str
    nodes: dict[str, tuple[str, subprocess.Popen]]
    version_id: str
    settings: object


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from charter.devnode.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def world(model_dir, configured, make_person) -> Iterator[World]:  # type: ignore[no-untyped-def]
    import dataclasses

    from charter.actor import SYSTEM
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team
    from charter.nodes import service as nodes
    from charter.registry import service as registry
    from charter.registry.importer import ImportOptions, content_revision, import_directory
    from charter.registry.schemas import ApprovalConditions, Transition

    settings = dataclasses.replace(configured, node_allowed_networks="127.0.0.0/8")
    steward, approver, operator = (make_person("steward"), make_person("approver"),
                                   make_person("operator"))
    revision = content_revision(model_dir)
    version, _ = import_directory(steward.actor, model_dir, ImportOptions(
        model_name="charter-tiny-llama", label="0.1", publisher="charter",
        source_repo="charter/tiny-llama", source_revision=revision,
        license_declared="apache-2.0", derivation="original",
        storage_region="eu-central", hosting_regions=("eu-central", "eu-west")))
    registry.submit_version(steward.actor, version.id, Transition())
    registry.approve_version(approver.actor, version.id, ApprovalConditions.model_validate_json(
        json.dumps({"allowed_regions": ["eu-central", "eu-west"],
                    "allowed_data_classes": ["internal", "restricted"],
                    "allowed_purposes": ["assistant"],
                    "expires_at": (utcnow() + timedelta(days=30)).isoformat()})))
    team = create_team(SYSTEM, name="apps", description="", requests_per_day=50,
                       entitlements={"models": ["*"], "data_classes": ["*"], "regions": ["*"]},
                       default_data_class="internal")
    bot = create_service_account(SYSTEM, team.id, username="apps-bot")
    key = create_api_key(SYSTEM, bot.id, name="e2e").token

    procs = {"central": start_node(model_dir, "eu-central", revision),
             "west": start_node(model_dir, "eu-west", revision),
             "rogue": start_node(model_dir, "eu-central", "0" * 64)}
    ids = {}
    for name, (url, _) in procs.items():
        node = nodes.register_node(operator.actor, settings, name=name, base_url=url,
                                   region="eu-west" if name == "west" else "eu-central",
                                   engine="tgi", labels={}, capacity=4)
        ids[name] = nodes.probe_node(settings, node.id).id
    nodes.create_deployment(operator.actor, serving_name="tiny", version_id=version.id,
                            node_ids=[ids["central"], ids["west"]])
    nodes.create_deployment(operator.actor, serving_name="rogue", version_id=version.id,
                            node_ids=[ids["rogue"]])

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
    env.update(CHARTER_DATABASE_URL=settings.database_url, CHARTER_SECRET_KEY=SECRET,
               CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="WARNING")
    server = subprocess.Popen([str(BIN / "charter"), "serve", "--bind", f"127.0.0.1:{port}",
                               "--workers", "1", "--threads", "32"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    charter = f"http://127.0.0.1:{port}"
    wait_http(charter + "/healthz", server)
    admin = make_person("admin")
    try:
        yield World(charter, key, admin.token, procs, version.id, settings)
    finally:
        for _, proc in [*procs.values(), ("", server)]:
            proc.kill()
            proc.wait(timeout=10)


def test_openai_client_unchanged(world) -> None:  # type: ignore[no-untyped-def]
    from openai import OpenAI

    client = OpenAI(base_url=f"{world.charter}/v1", api_key=world.key)
    assert [m.id for m in client.models.list()] == ["rogue", "tiny"]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.model == "tiny"  # the name the caller used, not the node's model id
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        temperature=0, stream=True))  # greedy: the random tiny model may stop at once
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert {c.model for c in chunks} == {"tiny"}
    outcomes = wait_events("dispatch.outcome", 2)  # a stream's outcome follows its last byte
    assert [e.outcome for e in outcomes] == ["success", "success"]
    assert outcomes[0].details["tokens_out"] > 0 and outcomes[0].details["node"] in (
        "central", "west")
    assert outcomes[1].details["stream"] is True and outcomes[1].details["ttft_ms"] > 0
    decisions = list_events(EventFilter(action="policy.decide", target_id="tiny"))
    assert len(decisions) == 2 and all(d.outcome == "success" for d in decisions)
    assert outcomes[0].details["decision_id"] == decisions[0].details["decision_id"]
    # Each outcome carries its request's id, the stream's too (written after its last byte).
    assert [o.request_id for o in outcomes] == [d.request_id for d in decisions]
    assert all(o.request_id for o in outcomes)
    assert verify_chain().ok


def test_tgi_clients_unchanged(world) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=f"{world.charter}/tgi/tiny", api_key=world.key)
    text = client.text_generation("The audit log", max_new_tokens=6)
    assert isinstance(text, str)
    out = client.text_generation("The audit log", max_new_tokens=6, details=True)
    assert out.details.finish_reason in ("length", "eos_token", "stop_sequence")
    tokens = list(client.text_generation("The audit log", max_new_tokens=6, stream=True))
    assert len(tokens) >= 1
    info = httpx.get(f"{world.charter}/tgi/tiny/info",
                     headers={"Authorization": f"Bearer {world.key}"}).json()
    assert info["model_id"] == "tiny"
    chat = InferenceClient(base_url=world.charter, api_key=world.key)
    reply = chat.chat_completion(messages=[{"role": "user", "content": "Hi"}], model="tiny",
                                 max_tokens=6)
    assert reply.choices[0].message.role == "assistant"


def test_gateway_answers_validate_against_tgis_schemas(world) -> None:  # type: ignore[no-untyped-def]
    from tests.tgi_schema import tgi_validator

    check = tgi_validator()
    h = {"Authorization": f"Bearer {world.key}"}
    params = {"max_new_tokens": 4, "details": True}
    r = httpx.post(f"{world.charter}/tgi/tiny/generate", headers=h,
                   json={"inputs": "x", "parameters": params})
    check("GenerateResponse", r.json())
    r = httpx.post(f"{world.charter}/tgi/tiny/", headers=h,
                   json={"inputs": "x", "parameters": params, "stream": False})
    assert isinstance(r.json(), list)
    for item in r.json():
        check("GenerateResponse", item)
    with httpx.stream("POST", f"{world.charter}/tgi/tiny/generate_stream", headers=h,
                      json={"inputs": "x", "parameters": params}) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert events and events[-1]["details"]["finish_reason"] in (
        "length", "eos_token", "stop_sequence")
    for event in events:
        check("StreamResponse", event)
    check("Info", httpx.get(f"{world.charter}/tgi/tiny/info", headers=h).json())
    r = httpx.post(f"{world.charter}/tgi/tiny/generate", headers=h, json={"inputs": ""})
    check("ErrorResponse", r.json())


def test_protocol_errors_use_each_protocols_shape(world) -> None:  # type: ignore[no-untyped-def]
    h = {"Authorization": f"Bearer {world.key}"}
    r = httpx.post(f"{world.charter}/v1/chat/completions", headers=h,
                   json={"model": "missing", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    refused = list_events(EventFilter(action="dispatch.refused"))
    assert [(e.target_id, e.details["code"]) for e in refused] == [("missing", "model_not_found")]
    r = httpx.post(f"{world.charter}/tgi/tiny/generate", headers=h,
                   json={"inputs": "x", "parameters": {"max_new_tokens": 10**9}})
    assert r.status_code == 422 and r.json()["error_type"] == "max_tokens_too_large"
    r = httpx.post(f"{world.charter}/v1/chat/completions",
                   headers={**h, "Content-Type": "application/json"}, content=b"{nope")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{world.charter}/v1/chat/completions",
                   json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    r = httpx.post(f"{world.charter}/v1/chat/completions", headers=h, json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert list_events(EventFilter(action="dispatch.outcome")) == []  # nothing dispatched


def test_unattested_node_gets_nothing(world) -> None:  # type: ignore[no-untyped-def]
    from charter.nodes.service import list_nodes

    rogue = next(n for n in list_nodes() if n.name == "rogue")
    assert rogue.attestation == "quarantined" and "no approved version" in \
        rogue.quarantine_reason
    q = list_events(EventFilter(action="node.quarantine"))
    assert [e.target_id for e in q] == [rogue.id]
    r = httpx.post(f"{world.charter}/tgi/rogue/generate",
                   headers={"Authorization": f"Bearer {world.key}"}, json={"inputs": "x"})
    assert r.status_code == 503 and r.json()["error_type"] == "no_attested_node"


def test_residency_routes_restricted_data_to_its_region(world) -> None:  # type: ignore[no-untyped-def]
    h = {"Authorization": f"Bearer {world.key}", "X-Charter-Data-Class": "restricted"}
    for _ in range(4):
        r = httpx.post(f"{world.charter}/tgi/tiny/generate", headers=h,
                       json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text
    regions = {e.details["region"] for e in wait_events("dispatch.outcome", 4)}
    assert regions == {"eu-central"}  # restricted data may not leave eu-central
    h["X-Charter-Data-Class"] = "confidential"  # not covered by the approval
    r = httpx.post(f"{world.charter}/tgi/tiny/generate", headers=h, json={"inputs": "x"})
    assert r.status_code == 403 and r.json()["error_type"] == "policy_denied"
    # Restricted data, but the only eu-central node is drained: no region may take it.
    from charter.actor import SYSTEM
    from charter.nodes.service import drain_node, list_nodes

    central = next(n for n in list_nodes() if n.name == "central")
    drain_node(SYSTEM, central.id, "maintenance")
    h["X-Charter-Data-Class"] = "restricted"
    r = httpx.post(f"{world.charter}/tgi/tiny/generate", headers=h, json={"inputs": "x"})
    assert r.status_code == 503 and r.json()["error_type"] == "no_node_in_allowed_region"


def test_client_disconnect_cancels_the_upstream_request(world) -> None:  # type: ignore[no-untyped-def]
    h = {"Authorization": f"Bearer {world.key}"}
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 500}}
    with httpx.stream("POST", f"{world.charter}/tgi/tiny/generate_stream", headers=h,
                      json=body, timeout=30) as r:
        for i, _line in enumerate(r.iter_lines()):
            if i >= 4:
                break  # the client goes away mid-stream
    deadline = time.monotonic() + 20
    outcome = None
    while time.monotonic() < deadline and outcome is None:
        events = list_events(EventFilter(action="dispatch.outcome"))
        outcome = events[-1] if events else None
        time.sleep(0.2)
    assert outcome is not None and outcome.details["outcome"] == "cancelled"
    assert outcome.details["tokens_out"] < 500


def test_revoking_stops_traffic_at_once(world) -> None:  # type: ignore[no-untyped-def]
    from charter.actor import SYSTEM
    from charter.registry import service as registry
    from charter.registry.schemas import RequiredReason

    h = {"Authorization": f"Bearer {world.key}"}
    body = {"inputs": "x", "parameters": {"max_new_tokens": 2}}
    assert httpx.post(f"{world.charter}/tgi/tiny/generate", headers=h, json=body).is_success
    registry.revoke_version(SYSTEM, world.version_id, RequiredReason(reason="license withdrawn"))
    r = httpx.post(f"{world.charter}/tgi/tiny/generate", headers=h, json=body)
    assert r.status_code == 403 and r.json()["error_type"] == "policy_denied"
    denied = list_events(EventFilter(action="policy.decide", outcome="denied"))
    assert denied[-1].details["violations"] == ["version_revoked"]


def test_quota_answers_429(world, pg_conn) -> None:  # type: ignore[no-untyped-def]
    pg_conn.execute("UPDATE teams SET requests_per_day = 1 WHERE name = 'apps'")
    h = {"Authorization": f"Bearer {world.key}"}
    body = {"inputs": "x", "parameters": {"max_new_tokens": 2}}
    assert httpx.post(f"{world.charter}/tgi/tiny/generate", headers=h, json=body).is_success
    r = httpx.post(f"{world.charter}/tgi/tiny/generate", headers=h, json=body)
    assert r.status_code == 429 and r.json()["error_type"] == "quota_exceeded"
    assert int(r.headers["Retry-After"]) > 0
    refused = list_events(EventFilter(action="dispatch.refused"))
    assert refused[-1].details["code"] == "quota_exceeded" and refused[-1].outcome == "denied"


def test_node_killed_mid_stream(world) -> None:  # type: ignore[no-untyped-def]
    from charter.actor import SYSTEM
    from charter.nodes.service import drain_node, list_nodes

    west = next(n for n in list_nodes() if n.name == "west")
    drain_node(SYSTEM, west.id, "keep the test on one node")
    h = {"Authorization": f"Bearer {world.key}"}
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 400}}
    events = []
    started = time.monotonic()
    with httpx.stream("POST", f"{world.charter}/tgi/tiny/generate_stream", headers=h,
                      json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if len(events) == 3:
                    world.nodes["central"][1].send_signal(signal.SIGKILL)
    assert time.monotonic() - started < 20
    assert "error" in events[-1] and events[-1]["error_type"] == "node_failed"
    outcome = wait_events("dispatch.outcome", 1)[-1]
    assert outcome.details["outcome"] == "aborted" and outcome.outcome == "failure"


def test_queued_outcomes_are_written_at_a_clean_shutdown(world) -> None:  # type: ignore[no-untyped-def]
    """Outcome events wait to share a commit; a stopping worker writes them (SIGTERM)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
    env.update(CHARTER_DATABASE_URL=world.settings.database_url, CHARTER_SECRET_KEY=SECRET,
               CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="WARNING",
               CHARTER_AUDIT_OUTCOME_LINGER_S="600")  # nothing is flushed by the timer
    server = subprocess.Popen([str(BIN / "charter"), "serve", "--bind", f"127.0.0.1:{port}",
                               "--workers", "1", "--threads", "4"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", server)
        h = {"Authorization": f"Bearer {world.key}"}
        body = {"inputs": "x", "parameters": {"max_new_tokens": 2}}
        for _ in range(3):
            r = httpx.post(f"http://127.0.0.1:{port}/tgi/tiny/generate", headers=h, json=body)
            assert r.status_code == 200
        time.sleep(0.5)
        # The last outcome is still queued (each earlier one rode with the next decision).
        assert len(list_events(EventFilter(action="dispatch.outcome"))) == 2
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=40) == 0
    finally:
        if server.poll() is None:
            server.kill()
    outcomes = list_events(EventFilter(action="dispatch.outcome"))
    assert [e.details["status"] for e in outcomes] == [200, 200, 200]
    assert verify_chain().ok


def test_a_lost_region_fails_over_to_another_allowed_region(world) -> None:  # type: ignore[no-untyped-def]
    """The only eu-central node dies: requests that may go to eu-west go there, the first
    one included (no probe interval to wait out); the node leaves the routes at once
    (`node.suspect`, audited); restricted data, which only eu-central may hold, is refused
    rather than moved; the node, started again with the same bytes, is served again after
    a probe, without restarting Charter."""
    from charter.nodes import service as nodes

    url, proc = world.nodes["central"]
    proc.kill()
    proc.wait(timeout=10)
    h = {"Authorization": f"Bearer {world.key}"}
    chat = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    # Idle nodes tie, and ties are random: 20 requests try eu-central first almost surely.
    codes = [httpx.post(f"{world.charter}/v1/chat/completions", headers=h, json=chat,
                        timeout=30).status_code for _ in range(20)]
    assert codes == [200] * 20
    suspect = list_events(EventFilter(action="node.suspect"))
    assert [e.details["name"] for e in suspect] == ["central"], suspect
    outcomes = wait_events("dispatch.outcome", 21)
    served = [o for o in outcomes if o.details["outcome"] == "completed"]
    failed = [o for o in outcomes if o.details["outcome"] == "failed"]
    assert len(served) == 20 and {o.details["node"] for o in served} == {"west"}
    assert len(failed) == 1 and "central" in failed[0].details["error"]
    retried = [d for d in list_events(EventFilter(action="policy.decide", target_id="tiny"))
               if d.details.get("retry_of")]
    assert [d.details["retry_of"] for d in retried] == [failed[0].details["decision_id"]]
    # Restricted data may live in eu-central only: never failed over to eu-west.
    r = httpx.post(f"{world.charter}/v1/chat/completions", json=chat, timeout=30,
                   headers={**h, "X-Charter-Data-Class": "restricted"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_node_in_allowed_region"
    # Back with the same bytes on the same address: a probe lets traffic in again.
    port = url.rsplit(":", 1)[1]
    again = subprocess.Popen(proc.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    world.nodes["central"] = (url, again)
    wait_http(url + "/health", again, timeout=120)
    central = next(n for n in nodes.list_nodes() if n.name == "central")
    assert nodes.probe_node(world.settings, central.id).routable, port
    r = httpx.post(f"{world.charter}/v1/chat/completions", json=chat, timeout=30,
                   headers={**h, "X-Charter-Data-Class": "restricted"})
    assert r.status_code == 200, r.text
    assert wait_events("dispatch.outcome", 22)[-1].details["node"] == "central"
    assert verify_chain().ok


def test_oversized_headers_are_answered_in_json(world) -> None:  # type: ignore[no-untyped-def]
    """A long header reaches Charter (which answers in the caller's protocol); one past
    gunicorn's own cap is answered by gunicorn, but as JSON, not an HTML page."""
    chat = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{world.charter}/v1/chat/completions", json=chat, timeout=30,
                   headers={"Authorization": "Bearer " + "x" * 20_000})
    assert r.status_code == 401, r.text[:300]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{world.charter}/v1/chat/completions", json=chat, timeout=30,
                   headers={"Authorization": "Bearer " + "x" * 70_000})
    assert r.status_code == 431 and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == "header_too_large" and {"message", "type", "param"} <= set(error)


def test_usage_is_the_nodes_own_count_for_every_protocol(world) -> None:  # type: ignore[no-untyped-def]
    """Streams and not, OpenAI's protocol and TGI's: the outcome records the tokens the
    node counted (asked of it where the caller did not ask), never an estimate; a caller
    that did not ask for usage does not get it."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{world.charter}/v1", api_key=world.key)
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}],
           "max_tokens": 6, "temperature": 0}
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    h = {"Authorization": f"Bearer {world.key}"}
    tgi = {"inputs": "Hello there", "parameters": {"max_new_tokens": 6}}
    r = httpx.post(f"{world.charter}/tgi/tiny/generate", headers=h, json=tgi, timeout=30)
    assert r.status_code == 200 and "details" not in r.json()
    with httpx.stream("POST", f"{world.charter}/tgi/tiny/generate_stream", headers=h,
                      json=tgi, timeout=30) as s:
        last = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")][-1]
    outcomes = wait_events("dispatch.outcome", 4)
    counted = [(o.details["tokens_in"], o.details["tokens_out"], o.details["tokens_estimated"])
               for o in outcomes]
    assert whole.usage is not None
    assert counted[0] == (whole.usage.prompt_tokens, whole.usage.completion_tokens, False)
    assert counted[1] == counted[0]  # the same greedy generation, streamed
    assert counted[2][2] is False and counted[2][1] == int(r.headers["x-generated-tokens"])
    assert counted[3] == (last["details"]["input_length"],
                          last["details"]["generated_tokens"], False)
