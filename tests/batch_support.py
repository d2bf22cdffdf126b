"""A real HTTP node for batch tests, and a governed world around it.

The node speaks what Charter asks of a TGI node (`/health`, `/info`), OpenAI's chat and
completions routes (whole or streamed) and TGI's `/generate`, `/generate_stream` and
`POST /`. It answers `echo: <last message>` (streamed in pieces of `piece` characters)
and records every request it gets (by that content) and the most requests it ever had in
flight at once.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.integration.test_access_matrix import _approved_version


@dataclass
class FakeNode:
    model_id: str
    revision: str | None
    delay_s: float = 0.0
    hits: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    fail_status: int | None = None
    traceparents: list[str | None] = field(default_factory=list)  # what each call carried
    bodies: list[tuple[str, Any]] = field(default_factory=list)  # (path, body) of each call
    piece: int = 4  # characters a streamed event carries
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeNode:
        node = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, body: Any, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/info":
                    self._send({"model_id": node.model_id, "model_sha": node.revision})
                else:
                    self._send({"status": "ok"})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = (body["messages"][-1]["content"] if "messages" in body
                           else body.get("prompt", body.get("inputs")))
                with node._lock:
                    node.hits[str(content)] += 1
                    node.traceparents.append(self.headers.get("traceparent"))
                    node.bodies.append((self.path, body))
                    node.in_flight += 1
                    node.max_in_flight = max(node.max_in_flight, node.in_flight)
                try:
                    time.sleep(node.delay_s)
                    if node.fail_status:
                        self._send({"error": "broken"}, node.fail_status)
                        return
                    answer = f"echo: {content}"
                    # TGI's routes; its POST / streams when the body asks
                    tgi = self.path in ("/generate", "/generate_stream") or (
                        self.path == "/" and "inputs" in body)
                    if self.path == "/generate_stream" or body.get("stream"):
                        self._stream(body, answer, tgi=tgi)
                        return
                    if tgi:
                        self._send({"generated_text": answer})
                        return
                    self._send({
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                        "model": body.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop", "message": {
                            "role": "assistant", "content": answer}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                  "total_tokens": 5}})
                finally:
                    with node._lock:
                        node.in_flight -= 1

            def _stream(self, body: dict[str, Any], answer: str, *, tgi: bool) -> None:
                pieces = [answer[i:i + node.piece] for i in range(0, len(answer), node.piece)]
                if tgi:
                    events = [{"index": i, "token": {"id": i, "text": p, "logprob": -0.5,
                                                      "special": False},
                               "generated_text": None, "details": None, "top_tokens": None}
                              for i, p in enumerate(pieces)]
                    events.append({"index": len(pieces), "token": {
                        "id": 2, "text": "</s>", "logprob": -0.1, "special": True},
                        "generated_text": answer, "top_tokens": None, "details": {
                            "finish_reason": "eos_token", "generated_tokens": len(pieces) + 1,
                            "seed": None, "input_length": 3}})
                else:
                    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
                        return {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                                "model": body.get("model"), "choices": [
                                    {"index": 0, "delta": delta, "finish_reason": finish}]}
                    events = [chunk({"role": "assistant", "content": ""}, None),
                              *(chunk({"content": p}, None) for p in pieces),
                              chunk({}, "stop")]
                    if (body.get("stream_options") or {}).get("include_usage"):
                        events.append({"id": "c1", "object": "chat.completion.chunk",
                                       "created": 1, "model": body.get("model"),
                                       "choices": [], "usage": {
                                           "prompt_tokens": 3, "completion_tokens": len(pieces),
                                           "total_tokens": 3 + len(pieces)}})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for event in events:
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                    self.wfile.flush()
                if not tgi:
                    self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass
class BatchWorld:
    settings: Any
    node: FakeNode
    node_id: str
    version_id: str
    team_id: str
    bot_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_world(configured: Any, make_person: Any, *, capacity: int = 8,
               delay_s: float = 0.0, requests_per_day: int | None = None,
               **overrides: Any) -> BatchWorld:
    """An approved version served by one real node as `m`, and a team's service account."""
    from charter.actor import SYSTEM
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team
    from charter.nodes import service as nodes
    from charter.registry.service import get_version

    version = get_version(_approved_version(make_person("steward"), 1))
    node = FakeNode(version.model.source_repo, version.source_revision, delay_s).start()
    settings = dataclasses.replace(configured, node_allowed_networks="127.0.0.0/8",
                                   **overrides)
    registered = nodes.register_node(SYSTEM, settings, name="n1", region="eu-central",
                                     base_url=node.url, engine="tgi", labels={},
                                     capacity=capacity)
    assert nodes.probe_node(settings, registered.id).attestation == "attested"
    nodes.create_deployment(SYSTEM, serving_name="m", version_id=version.id,
                            node_ids=[registered.id])
    team = create_team(SYSTEM, name="t", description="", requests_per_day=requests_per_day,
                       entitlements={"models": ["*"], "data_classes": ["*"], "regions": ["*"]},
                       default_data_class="internal")
    bot = create_service_account(SYSTEM, team.id, username="bot")
    key = create_api_key(SYSTEM, bot.id, name="k").token
    return BatchWorld(settings, node, registered.id, version.id, team.id, bot.id, key)


def jsonl_lines(n: int, *, start: int = 0, model: str = "m",
                url: str = "/v1/chat/completions") -> list[dict[str, Any]]:
    return [{"custom_id": f"req-{i}", "method": "POST", "url": url,
             "body": {"model": model, "max_tokens": 8,
                      "messages": [{"role": "user", "content": f"line-{i}"}]}}
            for i in range(start, start + n)]


def to_jsonl(lines: list[Any]) -> bytes:
    return ("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
            + "\n").encode()
