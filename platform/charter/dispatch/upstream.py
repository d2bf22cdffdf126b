"""Sending an admitted request to a node: shared by the gateway and the batch runner.

No Flask here. The caller picks the node (a Plan's nodes, in order) and owns the response;
`send` re-checks the node's address against the SSRF policy on every call and turns a
node's 5xx or redirect into NodeRefused, so the caller may try the next node (only before
the first byte of an answer has been passed on).
"""

from __future__ import annotations

import json
from typing import Any

import structlog

from charter.nodes import adapters
from charter.nodes import service as nodes
from charter.nodes.client import NodePool, NodeResponse
from charter.nodes.service import NodeTarget
from charter.nodes.ssrf import NodeUrlPolicy

log = structlog.get_logger("charter.dispatch")


class NodeRefused(Exception):
    """The node answered with a server error or a redirect: another node may be tried."""

    def __init__(self, node: NodeTarget, status: int) -> None:
        super().__init__(f"{node.name}: HTTP {status}")
        self.status = status


def payload_for(node: NodeTarget, protocol: str, body: dict[str, Any], raw: bytes) -> bytes:
    """The bytes to send: the caller's, but OpenAI's `model` names what the node serves."""
    if protocol == "openai" and node.reported_model_id:
        return json.dumps({**body, "model": node.reported_model_id}).encode()
    return raw


def suspect(node: NodeTarget, reason: str) -> None:
    """A connection refused, reset or timed out before the first byte: the node leaves
    every worker's routes until a probe finds it healthy (nodes.service.mark_suspect). A
    database that cannot say so does not stop the caller from trying the next node."""
    try:
        nodes.mark_suspect(node.id, reason)
    except Exception as exc:  # noqa: BLE001 - the request goes on to the next node
        log.error("could not mark the node suspect", node=node.name, error=str(exc))


def send(pool: NodePool, policy: NodeUrlPolicy, node: NodeTarget, path: str, payload: bytes,
         headers: dict[str, str]) -> NodeResponse:
    """POST to the node; raises NodeCallError, CharterError (SSRF) or NodeRefused."""
    target = policy.resolve(node.base_url)  # re-checked: DNS may have moved
    resp = pool.request(target, "POST", path, payload, headers)
    if resp.status >= 500 or 300 <= resp.status < 400:
        # A node error, or a redirect (never followed, never passed on).
        resp.close(reuse=False)
        raise NodeRefused(node, resp.status)
    return resp


def error_for_caller(protocol: str, node: NodeTarget, content: bytes) -> bytes:
    """A node's refusal (4xx) in the caller's protocol: TGI's passed on to a TGI caller;
    anything else rebuilt from what it says (vLLM's `{"object": "error"}`, Ollama's
    `{"error": "..."}`, FastAPI's `{"detail"}`, text), in OpenAI's four-key error object
    for an OpenAI caller (keeping the node's `type`, `param` and `code` where it gave them)."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if protocol == "tgi" and node.engine == "tgi":
        return content
    message = adapters.error_message(content)
    if protocol == "openai":
        given = body.get("error") if isinstance(body, dict) else None
        given = given if isinstance(given, dict) else {}
        return json.dumps({"error": {
            "message": message, "type": given.get("type") or "invalid_request_error",
            "param": given.get("param"), "code": given.get("code") or "node_rejected"}}).encode()
    return json.dumps({"error": message, "error_type": "validation"}).encode()


def usage(protocol: str, body: Any) -> tuple[int, int]:
    """(tokens in, tokens out) from a whole answer in the protocol's shape."""
    if isinstance(body, list) and body:
        body = body[0]
    if not isinstance(body, dict):
        return 0, 0
    if protocol == "openai":
        found = body.get("usage") or {}
        return int(found.get("prompt_tokens") or 0), int(found.get("completion_tokens") or 0)
    details = body.get("details") or {}
    return len(details.get("prefill") or []), int(details.get("generated_tokens") or 0)


def named_as_asked(content: bytes, serving_name: str) -> bytes:
    """A whole OpenAI answer whose `model` is the serving name the caller used (the node
    names what it loaded: a path, a Hub id); anything else is passed on unchanged."""
    try:
        body = json.loads(content)
    except ValueError:
        return content
    if not isinstance(body, dict) or "model" not in body:
        return content
    body["model"] = serving_name
    return json.dumps(body, separators=(",", ":")).encode()


class StreamRenamer:
    """The same for a stream of server-sent events: each complete event's `data:` JSON gets
    the serving name as `model`; a partial event waits for its end (the next chunk)."""

    def __init__(self, serving_name: str) -> None:
        self.serving_name = serving_name
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        end = max(data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n"))
        if end < 0:
            self._pending = data
            return b""
        cut = end + (4 if data[end:end + 4] == b"\r\n\r\n" else 2)
        self._pending = data[cut:]
        return self._rename(data[:cut])

    def rest(self) -> bytes:
        """What is left when the node ends: passed on as it came."""
        rest, self._pending = self._pending, b""
        return rest

    def _rename(self, events: bytes) -> bytes:
        lines = events.split(b"\n")
        for i, line in enumerate(lines):
            if line.startswith(b"data:") and b'"model"' in line:
                payload = line[5:].strip()
                renamed = named_as_asked(payload, self.serving_name)
                if renamed is not payload:
                    lines[i] = b"data: " + renamed + (b"\r" if line.endswith(b"\r") else b"")
        return b"\n".join(lines)
