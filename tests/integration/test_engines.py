"""The engine adapters against each engine's published HTTP surface: a real HTTP server per
engine answering what its documentation says it answers (health route, model list, error
shape), probed by Charter's adapter; refusals reach the caller in the caller's protocol.
llama.cpp's own server runs for real in tests/e2e/test_llamacpp.py where it can be built."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from charter.dispatch.upstream import error_for_caller
from charter.nodes import adapters
from charter.nodes.service import NodeTarget

# What each engine answers, from its documentation: path -> (status, body).
SURFACES: dict[str, dict[str, tuple[int, Any]]] = {
    "tgi": {"/health": (200, None),
            "/info": (200, {"model_id": "/data/model", "model_sha": None})},
    "vllm": {"/health": (200, None),
             "/v1/models": (200, {"object": "list", "data": [
                 {"id": "tinyllama", "object": "model", "owned_by": "vllm"}]})},
    "sglang": {"/health": (200, None),
               "/v1/models": (200, {"object": "list", "data": [{"id": "/data/model"}]})},
    "llamacpp": {"/v1/models": (200, {"object": "list", "data": [
        {"id": "/models/tiny.gguf", "object": "model", "owned_by": "me"}]})},
    "ollama": {"/api/version": (200, {"version": "0.9.6"}),
               "/v1/models": (200, {"object": "list", "data": [
                   {"id": "tinyllama:latest", "object": "model", "owned_by": "library"}]})},
    "openai": {"/v1/models": (200, {"object": "list", "data": [{"id": "m"}]})},
}
EXPECTED_ID = {"tgi": "/data/model", "vllm": "tinyllama", "sglang": "/data/model",
               "llamacpp": "/models/tiny.gguf", "ollama": "tinyllama:latest", "openai": "m"}


def _serve(routes: dict[str, tuple[int, Any]]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            status, body = routes.get(self.path, (404, {"detail": "Not Found"}))
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


@pytest.mark.parametrize("kind", sorted(SURFACES))
def test_each_engine_is_probed_on_its_own_surface(client: httpx.Client, kind: str) -> None:
    server = _serve(SURFACES[kind])
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = adapters.probe(client, url, kind, {})
        assert result.healthy, result
        assert result.model_id == EXPECTED_ID[kind] and result.revision is None
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", sorted(SURFACES))
def test_an_engine_that_is_down_is_unhealthy_and_says_why(client: httpx.Client,
                                                          kind: str) -> None:
    server = _serve({})  # every route 404
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = adapters.probe(client, url, kind, {})
        assert not result.healthy and "404" in result.error, result
    finally:
        server.shutdown()
        server.server_close()


def test_only_tgi_speaks_tgis_protocol() -> None:
    assert {k for k, e in adapters.ENGINES.items() if "tgi" in e.protocols} == {"tgi"}
    assert all("openai" in e.protocols for e in adapters.ENGINES.values())


# Each engine's documented error answer for a request it refuses (HTTP 400).
ERRORS = {
    "vllm": {"object": "error", "message": "max_tokens is too large", "type":
             "BadRequestError", "param": None, "code": 400},
    "ollama": {"error": "max_tokens is too large"},
    "llamacpp": {"error": {"code": 400, "message": "max_tokens is too large",
                           "type": "invalid_request_error"}},
    "sglang": {"detail": "max_tokens is too large"},
    "tgi": {"error": "max_tokens is too large", "error_type": "validation"},
}


@pytest.mark.parametrize("kind", sorted(ERRORS))
@pytest.mark.parametrize("protocol", ["openai", "tgi"])
def test_a_refusal_reaches_the_caller_in_the_callers_protocol(kind: str,
                                                              protocol: str) -> None:
    node = NodeTarget("id", "n", "http://x", "eu-central", kind, None)
    out = json.loads(error_for_caller(protocol, node, json.dumps(ERRORS[kind]).encode()))
    if protocol == "openai":
        assert out["error"]["message"] == "max_tokens is too large"
        assert {"type", "param", "code"} <= set(out["error"])
    else:
        assert out == {"error": "max_tokens is too large", "error_type": "validation"}


def test_a_refusal_in_plain_text_is_still_an_error_shape() -> None:
    node = NodeTarget("id", "n", "http://x", "eu-central", "openai", None)
    out = json.loads(error_for_caller("openai", node, b"Bad Request: no prompt\n"))
    assert out["error"]["message"] == "Bad Request: no prompt"
