"""Hostile bodies at the OpenAI and TGI endpoints: each answered in the caller's protocol's
error shape, with a specific code, and nothing dispatched to the node."""

from __future__ import annotations

from typing import Any

import pytest

from tests.batch_support import make_world

CHAT = "/v1/chat/completions"
DEEP = "[" * 100_000 + "]" * 100_000  # 200 kB: under the body limit, too deep to parse
HUGE_DEEP = "[" * 600_000 + "]" * 600_000  # 1.2 MB: over it


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


CASES: list[tuple[str, str, Any, int, str]] = [
    # (name, path, body (bytes: sent raw), status, code)
    ("malformed JSON", CHAT, b'{"model": "m", "messages": [', 400, "invalid_json"),
    ("not an object", CHAT, b'["m"]', 400, "invalid_request"),
    ("invalid UTF-8", CHAT, b'{"model": "m\xff\xfe", "messages": []}', 400, "invalid_json"),
    ("deeply nested", CHAT, DEEP.encode(), 400, "invalid_json"),
    ("deeply nested and oversized", CHAT, HUGE_DEEP.encode(), 413, "payload_too_large"),
    ("deeply nested, small", CHAT, ('{"model": "m", "x": ' + "[" * 5000 + "]" * 5000
                                    + "}").encode(), 400, "invalid_json"),
    ("messages not a list", CHAT, {"model": "m", "messages": "hi"}, 400, "invalid_request"),
    ("model not a string", CHAT, {"model": 7, "messages": []}, 400, "invalid_request"),
    ("max_tokens a string", CHAT, _chat(max_tokens="9"), 400, "invalid_request"),
    ("max_tokens huge", CHAT, _chat(max_tokens=10**12), 400, "max_tokens_too_large"),
    ("max_tokens negative", CHAT, _chat(max_tokens=-1), 400, "invalid_request"),
    ("max_tokens a bool", CHAT, _chat(max_tokens=True), 400, "invalid_request"),
    ("a huge prompt", CHAT, {"model": "m", "messages": [
        {"role": "user", "content": "x" * 3_000_000}]}, 413, "payload_too_large"),
    ("TGI malformed", "/generate", b'{"inputs": ', 422, "invalid_json"),
    ("TGI max_new_tokens huge", "/generate",
     {"inputs": "hi", "parameters": {"max_new_tokens": 10**9}}, 422, "max_tokens_too_large"),
    ("TGI inputs not a string", "/generate", {"inputs": ["hi"]}, 422, "invalid_request"),
    ("TGI oversized", "/generate_stream", {"inputs": "x" * 3_000_000}, 413,
     "payload_too_large"),
]


@pytest.fixture
def gateway(configured, make_person):  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    yield world, app_for(world.settings).test_client()
    world.node.stop()


@pytest.mark.parametrize(("name", "path", "body", "status", "code"), CASES,
                         ids=[c[0] for c in CASES])
def test_hostile_bodies_are_refused_before_dispatch(  # type: ignore[no-untyped-def]
        gateway, name, path, body, status, code) -> None:
    world, client = gateway
    headers = {**world.headers, "Content-Type": "application/json"}
    if isinstance(body, bytes):
        r = client.post(path, headers=headers, data=body)
    else:
        r = client.post(path, headers=headers, json=body)
    assert r.status_code == status, r.get_data(as_text=True)[:300]
    payload = r.get_json()
    if path == CHAT:  # OpenAI's shape
        assert payload["error"]["code"] == code and payload["error"]["type"]
        assert set(payload["error"]) == {"message", "type", "param", "code"}
    else:  # TGI's shape
        assert payload["error_type"] == code and isinstance(payload["error"], str)
    assert world.node.hits == {}


def test_refusals_of_authenticated_callers_are_audited(gateway) -> None:  # type: ignore[no-untyped-def]
    from charter.audit.service import EventFilter, list_events

    world, client = gateway
    client.post(CHAT, headers=world.headers, json=_chat(max_tokens=10**12))
    client.post("/generate", headers=world.headers, data=b'{"inputs": ',
                content_type="application/json")
    refused = list_events(EventFilter(action="dispatch.refused"))
    assert [e.details["code"] for e in refused] == ["max_tokens_too_large", "invalid_json"]
    assert all(e.actor.startswith("service:") or ":" in e.actor for e in refused)
