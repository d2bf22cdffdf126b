"""The gateway decides on cached data, but never on stale data: it commits only if current.

Changes made by another process (here: this test, through its own connections) apply to the
very next request; a request whose decision cannot be committed is not served.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from charter.actor import SYSTEM
from charter.audit.service import EventFilter, list_events, verify_chain
from tests.integration.test_access_matrix import _approved_version
from tests.runtimes import flush_outcomes

GENERATED = {"generated_text": " ok", "details": {"finish_reason": "length",
                                                   "generated_tokens": 1, "prefill": []}}


@dataclass
class World:
    client: Any
    key: str
    bot_id: str
    team_id: str
    version_id: str
    hits: list[str]

    def generate(self, key: str | None = None) -> Any:
        return self.client.post("/tgi/m/generate", json={"inputs": "x"},
                                headers={"Authorization": f"Bearer {key or self.key}"})


@pytest.fixture
def world(configured, make_person) -> Iterator[World]:  # type: ignore[no-untyped-def]
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team
    from charter.nodes import service as nodes
    from charter.registry.service import get_version
    from tests.runtimes import app_for

    version = get_version(_approved_version(make_person("steward"), 1))
    hits: list[str] = []

    class Node(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            info = {"model_id": version.model.source_repo, "model_sha": version.source_revision}
            self._send(info if self.path == "/info" else {})

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            hits.append(self.path)
            self._send(GENERATED)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Node)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = dataclasses.replace(configured, node_allowed_networks="127.0.0.0/8")
    node = nodes.register_node(SYSTEM, settings, name="n1", region="eu-central",
                               base_url=f"http://127.0.0.1:{server.server_address[1]}",
                               engine="tgi", labels={}, capacity=1)
    assert nodes.probe_node(settings, node.id).attestation == "attested"
    nodes.create_deployment(SYSTEM, serving_name="m", version_id=version.id,
                            node_ids=[node.id])
    team = create_team(SYSTEM, name="t", description="", requests_per_day=None,
                       entitlements={"models": ["*"], "data_classes": ["*"], "regions": ["*"]},
                       default_data_class="internal")
    bot = create_service_account(SYSTEM, team.id, username="bot")
    key = create_api_key(SYSTEM, bot.id, name="k").token
    try:
        yield World(app_for(settings).test_client(), key, bot.id, team.id, version.id, hits)
    finally:
        server.shutdown()
        server.server_close()


def _decisions() -> list[Any]:
    return list_events(EventFilter(action="policy.decide", target_id="m"))


def test_a_key_revoked_elsewhere_is_refused_on_the_next_request(world, pg_conn) -> None:  # type: ignore[no-untyped-def]
    assert world.generate().status_code == 200  # key, caller and route are now cached
    pg_conn.execute("UPDATE api_keys SET revoked_at = now()")  # another process, say
    r = world.generate()
    assert r.status_code == 401 and r.get_json()["error_type"] == "invalid_credentials"
    assert world.hits == ["/generate"]
    assert list_events(EventFilter(action="auth.failed"))[-1].details["code"] == (
        "invalid_credentials")


def test_a_key_made_after_the_cache_was_filled_works_at_once(world) -> None:  # type: ignore[no-untyped-def]
    from charter.identity.service import create_api_key

    assert world.generate().status_code == 200
    fresh = create_api_key(SYSTEM, world.bot_id, name="second").token
    assert world.generate(fresh).status_code == 200
    assert list_events(EventFilter(action="auth.failed")) == []  # no spurious failure


def test_a_revocation_applies_to_the_next_request_and_nothing_stale_is_recorded(world) -> None:  # type: ignore[no-untyped-def]
    from charter.registry import service as registry
    from charter.registry.schemas import RequiredReason

    assert world.generate().status_code == 200
    registry.revoke_version(SYSTEM, world.version_id, RequiredReason(reason="withdrawn"))
    r = world.generate()
    assert r.status_code == 403 and r.get_json()["error_type"] == "policy_denied"
    assert world.hits == ["/generate"]
    # The attempt decided on the old generation was not written: one decision per request.
    assert [d.outcome for d in _decisions()] == ["success", "denied"]
    assert _decisions()[-1].details["violations"] == ["version_revoked"]
    assert verify_chain().ok


def test_an_entitlement_withdrawn_elsewhere_applies_at_once(world, pg_conn) -> None:  # type: ignore[no-untyped-def]
    assert world.generate().status_code == 200
    pg_conn.execute("UPDATE teams SET entitlements = %s",
                    (json.dumps({"models": ["other"], "data_classes": ["*"],
                                 "regions": ["*"]}),))
    r = world.generate()
    assert r.status_code == 403 and r.get_json()["error_type"] == "policy_denied"
    assert world.hits == ["/generate"]


def test_no_audit_write_means_no_dispatch(world, pg_conn) -> None:  # type: ignore[no-untyped-def]
    assert world.generate().status_code == 200
    pg_conn.execute("ALTER TABLE audit_events ADD CONSTRAINT no_more CHECK (false) NOT VALID")
    r = world.generate()
    assert r.status_code == 503 and r.get_json()["error_type"] == "audit_unavailable"
    assert world.hits == ["/generate"]  # the node was never called
    pg_conn.execute("ALTER TABLE audit_events DROP CONSTRAINT no_more")
    assert world.generate().status_code == 200  # recovers by itself
    assert flush_outcomes()
    outcomes = list_events(EventFilter(action="dispatch.outcome"))
    assert [e.details["status"] for e in outcomes] == [200, 200]  # none lost, none extra
    assert verify_chain().ok


def test_a_failing_policy_engine_refuses_and_is_audited(world) -> None:  # type: ignore[no-untyped-def]
    from charter.policy.engine import PolicyUnavailableError

    class Down:
        name, revision = "broken", "sha256:" + "0" * 64  # a revision no verdict is cached for

        def evaluate(self, _policy: str, _doc: dict) -> Any:  # type: ignore[type-arg]
            raise PolicyUnavailableError("the policy engine did not answer",
                                         code="policy_timeout")

    policies = world.client.application.extensions["charter.runtime"].policies
    working, policies.engine = policies.engine, Down()
    try:
        r = world.generate()
    finally:
        policies.engine = working
    assert r.status_code == 503 and r.get_json()["error_type"] == "policy_timeout"
    assert world.hits == []  # fail closed: nothing reached the node
    failure = _decisions()[-1]
    assert failure.outcome == "failure" and failure.details["error"] == "policy_timeout"
    assert world.generate().status_code == 200  # and back once the engine answers


def test_a_key_use_is_recorded_without_clearing_the_read_cache(world, pg_conn) -> None:  # type: ignore[no-untyped-def]
    from charter.readcache import current_generation as read_generation

    pg_conn.execute("UPDATE api_keys SET last_used_at = NULL")
    generation = read_generation()
    for _ in range(3):
        assert world.generate().status_code == 200
    used = pg_conn.execute("SELECT count(*) FROM api_keys WHERE last_used_at IS NOT NULL")
    assert used.fetchone()[0] == 1
    assert read_generation() == generation  # bookkeeping only (migration 0006)


def test_a_registry_that_never_settles_answers_503_registry_busy(world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from charter.dispatch import service
    from charter.readcache import StaleReadError
    from charter.readcache import current_generation as read_generation

    calls: list[int] = []

    def always_stale(*_args: Any, **_kwargs: Any) -> Any:
        calls.append(1)
        raise StaleReadError(read_generation())  # as if it moved every time

    monkeypatch.setattr(service, "admit", always_stale)
    r = world.client.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {world.key}"})
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "registry_busy"
    assert r.headers["Retry-After"] == "1"
    assert len(calls) == 5 and world.hits == []
    refused = list_events(EventFilter(action="dispatch.refused"))[-1]
    assert refused.details["code"] == "registry_busy" and refused.outcome == "denied"


@pytest.mark.parametrize("name", ["a\x00b", "x" * 201, "tab\there", "line\nbreak"])
def test_a_serving_name_no_deployment_could_have_is_refused_before_anything(world, name) -> None:  # type: ignore[no-untyped-def]
    h = {"Authorization": f"Bearer {world.key}"}
    r = world.client.post("/v1/chat/completions", headers=h, json={
        "model": name, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_model_name"
    assert world.hits == []
    assert world.generate().status_code == 200  # and nothing was left in the writer


def test_tgi_path_names_are_checked_too(world) -> None:  # type: ignore[no-untyped-def]
    r = world.client.post("/tgi/a%00b/generate", json={"inputs": "x"},
                          headers={"Authorization": f"Bearer {world.key}"})
    assert r.status_code == 422 and r.get_json()["error_type"] == "invalid_model_name"
    assert world.hits == []


def test_events_the_columns_cannot_hold_are_refused_before_queueing() -> None:
    from charter.audit.journal import Event

    with pytest.raises(ValueError, match="target_id"):
        Event.of(actor="a", action="b", target_type="c", target_id="x" * 201)
    with pytest.raises(ValueError, match="actor"):
        Event.of(actor="a\x00", action="b", target_type="c", target_id="d")
