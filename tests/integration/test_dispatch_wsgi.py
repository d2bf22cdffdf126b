"""The dispatch routes' own WSGI path (charter.dispatch.wsgi): the same routes, the same
rules as Flask's hooks, bounded bodies however they are framed, errors in the caller's
protocol's shape; and a chunked body through `charter serve`."""

from __future__ import annotations

import http.client
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from charter.audit.service import EventFilter, list_events
from charter.dispatch.wsgi import PATHS, match
from tests.batch_support import make_world

CHAT = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


# --- the route table ------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "endpoint", "name"), [
    ("/v1/chat/completions", "gateway.chat_completions", None),
    ("/v1/completions", "gateway.completions", None),
    ("/v1/embeddings", "gateway.embeddings", None),
    ("/generate", "gateway.generate", None),
    ("/generate_stream", "gateway.generate_stream", None),
    ("/embed", "gateway.embed", None),
    ("/", "gateway.compat", None),
    ("/tgi/m/generate", "gateway.generate", "m"),
    ("/tgi/m/generate_stream", "gateway.generate_stream", "m"),
    ("/tei/e/embed", "gateway.embed", "e"),
    ("/tgi/m", "gateway.compat", "m"),
    ("/tgi/m/", "gateway.compat", "m"),
    ("/tei/e", "gateway.compat", "e"),
    ("/tei/e/", "gateway.compat", "e"),
    ("/tgi/a name with spaces/generate", "gateway.generate", "a name with spaces"),
])
def test_the_dispatch_routes_and_their_names(path: str, endpoint: str, name: str | None) -> None:
    found = match(path)
    assert found is not None and (found[0].endpoint, found[1]) == (endpoint, name)


@pytest.mark.parametrize("path", [
    "/tgi/m/info", "/tei/e/info", "/v1/models", "/v1/files", "/v1/batches", "/info",
    "/tgi//generate", "/tgi/m/generate/", "/tei/e/generate", "/tgi/m/embed", "/tgi/a/b/generate",
    "/v1/chat/completions/", "//generate", "/api/v1/models", "/tgi", "/tgi/",
])
def test_other_paths_go_on_to_flask(path: str) -> None:
    assert match(path) is None


def test_the_route_table_names_each_rule_once() -> None:
    assert len(PATHS) == len(set(PATHS)) == 14


# --- in-process -----------------------------------------------------------------------------

def _environ(path: str, body: bytes, headers: dict[str, str], *,
             length: bool = True) -> dict[str, Any]:
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "",
               "SERVER_NAME": "localhost", "SERVER_PORT": "80",
               "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
               "wsgi.errors": sys.stderr, "wsgi.multithread": True,
               "wsgi.multiprocess": False, "wsgi.run_once": False, "wsgi.version": (1, 0)}
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    environ["CONTENT_TYPE"] = "application/json"
    if length:
        environ["CONTENT_LENGTH"] = str(len(body))
    else:  # what gunicorn says of a chunked body: read to its end
        environ["wsgi.input_terminated"] = True
    return environ


def _call(app: Any, environ: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
    answered: list[Any] = []
    body = app(environ, lambda status, headers, exc_info=None: answered.extend(
        [status, dict(headers)]))
    try:
        data = b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()
    return answered[0], answered[1], data


def test_a_chunked_body_is_read_to_its_end_and_no_further_than_the_limit(
        configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    world = make_world(configured, make_person, max_body_bytes=4096)
    try:
        app = app_for(world.settings)
        headers = {"Authorization": f"Bearer {world.key}"}
        status, _, data = _call(app, _environ(
            "/v1/chat/completions", json.dumps(CHAT).encode(), headers, length=False))
        assert status.startswith("200"), data[:300]
        assert json.loads(data)["choices"][0]["message"]["content"] == "echo: hi"
        hits = sum(world.node.hits.values())
        big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]})
        environ = _environ("/v1/chat/completions", big.encode(), headers, length=False)
        status, answered, data = _call(app, environ)
        assert status.startswith("413"), data[:300]
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"}  # OpenAI's shape
        assert error["code"] == "payload_too_large" and "4096 bytes" in error["message"]
        assert environ["wsgi.input"].tell() == 4097  # the limit and one byte, not the rest
        assert answered["X-Request-Id"]
        assert sum(world.node.hits.values()) == hits  # nothing more reached the node
        refused = list_events(EventFilter(action="dispatch.refused", limit=10))
        assert [(e.target_id, e.details["code"], e.details["max_body_bytes"])
                for e in refused] == [("-", "payload_too_large", 4096)]  # no name was read
    finally:
        world.node.stop()


def test_a_body_shorter_than_its_length_is_a_recorded_refusal(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    try:
        app = app_for(world.settings)
        environ = _environ("/tgi/m/generate", b'{"inputs": "cut', {
            "Authorization": f"Bearer {world.key}"})
        environ["CONTENT_LENGTH"] = "100"
        status, _, data = _call(app, environ)
        assert status.startswith("422"), data[:300]  # TGI's validation status
        assert json.loads(data) == {"error": "the body ended before its Content-Length",
                                    "error_type": "incomplete_body"}
        refused = list_events(EventFilter(action="dispatch.refused", limit=10))
        assert [(e.target_id, e.details["code"]) for e in refused] == [("m", "incomplete_body")]
        assert sum(world.node.hits.values()) == 0
    finally:
        world.node.stop()


@pytest.mark.parametrize(("path", "shape"), [("/v1/chat/completions", "openai"),
                                              ("/tgi/m/generate", "tgi")])
def test_a_caller_is_authenticated_before_its_body_is_read(configured, make_person,  # type: ignore[no-untyped-def]
                                                           path: str, shape: str) -> None:
    """No credential, or a wrong one: 401 in the caller's protocol, and not a byte of a
    (large) body read, so a stranger cannot make the gateway read and parse megabytes."""
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    try:
        app = app_for(world.settings)
        big = json.dumps({**CHAT, "inputs": "x" * 900_000}).encode()
        for headers in ({}, {"Authorization": "Bearer chk_0123456789abcdef_nope"}):
            environ = _environ(path, big, headers)
            status, answered, data = _call(app, environ)
            assert status.startswith("401"), data[:300]
            assert answered["WWW-Authenticate"] == 'Bearer realm="charter"'
            error = json.loads(data)
            code = error["error"]["code"] if shape == "openai" else error["error_type"]
            assert code == ("unauthenticated" if not headers else "invalid_credentials")
            assert environ["wsgi.input"].tell() == 0
        assert sum(world.node.hits.values()) == 0
    finally:
        world.node.stop()


@pytest.mark.parametrize("length", ["-5", "12abc", " 1", "+3"])
def test_a_content_length_that_is_not_a_size_reads_nothing(configured, make_person,  # type: ignore[no-untyped-def]
                                                           length: str) -> None:
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    try:
        app = app_for(world.settings)
        environ = _environ("/v1/chat/completions", json.dumps(CHAT).encode(), {
            "Authorization": f"Bearer {world.key}"})
        environ["CONTENT_LENGTH"] = length
        status, _, data = _call(app, environ)
        assert status.startswith("400"), data[:300]
        assert json.loads(data)["error"]["code"] == "invalid_content_length"
        assert environ["wsgi.input"].tell() == 0  # not a byte of the body read
        refused = list_events(EventFilter(action="dispatch.refused", limit=10))
        assert [e.details["code"] for e in refused] == ["invalid_content_length"]
        assert sum(world.node.hits.values()) == 0
    finally:
        world.node.stop()


def test_the_door_keeps_flasks_rules(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    """Request ids, default headers, metrics by route, 405 for other methods: as Flask's
    hooks have them for every other route."""
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    try:
        app = app_for(world.settings)
        client = app.test_client()
        r = client.post("/tgi/m/generate", headers={**world.headers, "X-Request-Id": "mine-1"},
                        json={"inputs": "hi", "parameters": {"max_new_tokens": 4}})
        assert r.status_code == 200, r.get_data(as_text=True)[:300]
        assert r.headers["X-Request-Id"] == "mine-1"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Cache-Control"] == "no-store"
        assert r.headers["Content-Type"] == "application/json"
        decided = list_events(EventFilter(action="policy.decide", limit=10))[-1]
        assert decided.request_id == "mine-1"
        r = client.post("/tgi/m/generate", headers={**world.headers, "X-Request-Id": "no\tway"},
                        json={"inputs": "hi"})
        assert r.status_code == 200 and len(r.headers["X-Request-Id"]) == 32
        r = client.post("/tgi/m/generate_stream", headers=world.headers,
                        json={"inputs": "hi", "parameters": {"max_new_tokens": 4}})
        assert r.status_code == 200 and r.headers["Cache-Control"] == "no-cache"
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert b"data:" in r.data
        registry = app.extensions["charter.runtime"].metrics
        assert registry.get_sample_value("charter_http_requests_total", {
            "method": "POST", "endpoint": "gateway.generate", "status": "200"}) == 2
        assert registry.get_sample_value("charter_http_requests_total", {
            "method": "POST", "endpoint": "gateway.generate_stream", "status": "200"}) == 1
        for method in ("GET", "PUT", "DELETE"):
            r = client.open("/v1/chat/completions", method=method, headers=world.headers)
            assert r.status_code == 405 and r.headers["Allow"] == "POST"
            assert r.get_json()["error"]["code"] == "method_not_allowed"
    finally:
        world.node.stop()


def test_an_unexpected_error_is_a_500_in_the_callers_shape(configured, make_person,  # type: ignore[no-untyped-def]
                                                           monkeypatch) -> None:
    from charter.dispatch import service
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    try:
        client = app_for(world.settings).test_client()

        def broken(*_a: Any, **_k: Any) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(service, "admit", broken)
        r = client.post("/v1/chat/completions", headers=world.headers, json=CHAT)
        assert r.status_code == 500
        error = r.get_json()["error"]
        assert (error["code"], error["message"]) == ("internal_error",
                                                    "an unexpected error occurred")
        assert "a bug" not in r.get_data(as_text=True)
        assert r.headers["X-Request-Id"]
        r = client.post("/generate", headers={**world.headers, "X-Charter-Model": "m"},
                        json={"inputs": "hi"})
        assert r.status_code == 500 and r.get_json()["error_type"] == "internal_error"
        assert sum(world.node.hits.values()) == 0
    finally:
        world.node.stop()


# --- under charter serve ------------------------------------------------------------------

def test_a_chunked_body_through_charter_serve(configured, make_person,  # type: ignore[no-untyped-def]
                                              tmp_path: Path) -> None:
    """gunicorn ends a chunked body for the application (wsgi.input_terminated); the
    door reads it whole, and refuses one past the limit in OpenAI's shape."""
    from tests.processes import charter_serve

    world = make_world(configured, make_person)
    proc, url = charter_serve(configured.database_url, tmp_path)
    try:
        port = int(url.rsplit(":", 1)[1])

        def post(pieces: list[bytes]) -> tuple[int, dict[str, Any]]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("POST", "/v1/chat/completions", body=iter(pieces),
                             headers={**world.headers, "Content-Type": "application/json"},
                             encode_chunked=True)
                resp = conn.getresponse()
                return resp.status, json.loads(resp.read())
            finally:
                conn.close()

        raw = json.dumps(CHAT).encode()
        status, answer = post([raw[:10], raw[10:25], raw[25:]])
        assert status == 200, answer
        assert answer["choices"][0]["message"]["content"] == "echo: hi"
        limit = configured.max_body_bytes
        status, answer = post([b'{"model": "m", "messages": "'] + [b"x" * 65536] * (
            limit // 65536 + 2) + [b'"}'])
        assert status == 413, answer
        assert answer["error"]["code"] == "payload_too_large"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        world.node.stop()
