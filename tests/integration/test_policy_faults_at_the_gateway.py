"""The remote policy engine misbehaving, seen from the gateway: every request refused within
the configured timeout with a specific code, in the caller's protocol, every refusal audited,
nothing sent to the node, and service back without restarting Charter.

Each request here is one the verdict cache has not seen (it is emptied first): a verdict the
same revision already reached for the same input is reused without the engine (docs/policy.md)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from charter.audit.service import EventFilter, list_events
from tests.batch_support import make_world
from tests.opa_server import OpaTestServer

TIMEOUT_S = 0.4
CHAT = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def gateway(configured, make_person):  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    with OpaTestServer() as server:
        server.hang_s = 3.0
        settings = dataclasses.replace(configured, policy_backend="remote",
                                       opa_url=server.url, opa_timeout_s=TIMEOUT_S)
        world = make_world(settings, make_person)
        app = app_for(world.settings)
        yield server, world, app.test_client()
        world.node.stop()


def _forget_verdicts(client) -> None:  # type: ignore[no-untyped-def]
    """Empty the app's verdict cache: the next request is decided by the engine."""
    client.application.extensions["charter.runtime"].policies.verdicts._entries.clear()


@pytest.mark.parametrize(("mode", "code"), [
    ("hang", "policy_timeout"),
    ("garbage", "policy_engine_error"),
    ("error", "policy_engine_error"),
    ("undefined", "policy_undefined"),
    ("not_json_object", "policy_result_malformed"),
])
def test_every_request_is_refused_and_audited_then_served_again(gateway, mode, code) -> None:  # type: ignore[no-untyped-def]
    server, world, client = gateway
    assert client.post("/v1/chat/completions", headers=world.headers,
                       json=CHAT).status_code == 200
    hits = sum(world.node.hits.values())
    before = len(list_events(EventFilter(action="policy.decide", outcome="failure",
                                         limit=1000)))
    server.mode = mode
    for path, body in (("/v1/chat/completions", CHAT),
                       ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 4}})):
        _forget_verdicts(client)  # a request whose input it has not decided before
        started = time.monotonic()
        r = client.post(path, headers=world.headers, json=body)
        took = time.monotonic() - started
        assert r.status_code == 503, r.get_json()
        payload = r.get_json()
        got = payload["error"]["code"] if path.startswith("/v1/") else payload["error_type"]
        assert got == code
        assert took < TIMEOUT_S + 1.0
    assert sum(world.node.hits.values()) == hits  # nothing sent
    failures = list_events(EventFilter(action="policy.decide", outcome="failure",
                                       limit=1000))[before:]
    assert len(failures) == 2 and {f.details["error"] for f in failures} == {code}
    server.mode = "ok"
    _forget_verdicts(client)
    r = client.post("/v1/chat/completions", headers=world.headers, json=CHAT)
    assert r.status_code == 200  # recovered without a restart


def test_a_restarted_sidecar_gets_the_policies_again(gateway) -> None:  # type: ignore[no-untyped-def]
    server, world, client = gateway
    assert client.post("/v1/chat/completions", headers=world.headers,
                       json=CHAT).status_code == 200
    server.policies.clear()  # the sidecar came back empty
    server.data.clear()
    server.rebuild()
    _forget_verdicts(client)
    r = client.post("/v1/chat/completions", headers=world.headers, json=CHAT)
    assert r.status_code == 503  # the first finds the rule undefined...
    assert r.get_json()["error"]["code"] == "policy_undefined"
    _forget_verdicts(client)
    r = client.post("/v1/chat/completions", headers=world.headers, json=CHAT)
    assert r.status_code == 200  # ...and Charter pushes the bundle again for the next
