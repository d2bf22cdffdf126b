"""OpenAI- and TGI-compatible endpoints: parse, plan, proxy with streaming, record.

Real clients call these unchanged: the `openai` client (`/v1/...`) and TGI's clients
(`huggingface_hub.InferenceClient`, which posts to `/` of its base URL). TGI routes need a
serving name: `/tgi/<name>/...` (give `base_url=<charter>/tgi/<name>` to the client), or the
`X-Charter-Model` header on the bare routes. Errors use each protocol's own error shape.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import structlog
from flask import Blueprint, Response, current_app, g, request, stream_with_context

from charter.dispatch import service, upstream
from charter.dispatch.service import (
    OUTSTANDING,
    DispatchError,
    NodeTarget,
    Plan,
    StaleSnapshotError,
)
from charter.errors import CharterError, UnauthenticatedError
from charter.identity.actor import Actor
from charter.nodes.client import NodeCallError, NodePool, NodeResponse
from charter.nodes.ssrf import NodeUrlPolicy

log = structlog.get_logger("charter.gateway")
bp = Blueprint("gateway", __name__)
DATA_CLASS_HEADER = "X-Charter-Data-Class"
PURPOSE_HEADER = "X-Charter-Purpose"
MODEL_HEADER = "X-Charter-Model"
_MAX_STALE_RETRIES = 5


def _nodes() -> tuple[NodePool, NodeUrlPolicy]:
    """This process's node connection pool and URL policy (charter.dispatch.upstream),
    kept on the app: looking them up by the settings would hash every setting per request."""
    found = current_app.extensions.get("charter.node_pool")
    if found is None:
        found = upstream.nodes_for(current_app.extensions["charter.settings"])
        current_app.extensions["charter.node_pool"] = found
    return found  # type: ignore[no-any-return]


# --- error shapes ---------------------------------------------------------------------------

def _protocol() -> str:
    return "openai" if request.path.startswith("/v1/") else "tgi"


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> Response:
    if _protocol() == "openai":
        kind = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error"}.get(status, "api_error")
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    else:
        body = {"error": message, "error_type": code}
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    response.headers["X-Request-Id"] = g.get("request_id", "")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


@bp.errorhandler(CharterError)
def _charter_error(exc: CharterError) -> Response:
    actor = g.get("actor")
    if getattr(exc, "unrecorded", False) and actor is not None:
        # A malformed request of a known caller is a refused dispatch like any other; if
        # even that cannot be recorded, the caller hears so (audit_unavailable).
        name = str((request.view_args or {}).get("name") or g.get("asked_model") or "-")
        if not name.isprintable() or len(name) > 200:
            name = "-"  # a name no deployment could have (invalid_model_name says so)
        exc = service.record_refusal(actor, name, exc)
    headers = {}
    if "retry_after_s" in exc.details:
        headers["Retry-After"] = str(exc.details["retry_after_s"])
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="charter"'
    return error_response(exc.status, exc.code, exc.message, headers)


@bp.errorhandler(413)
def _too_large(_exc: Exception) -> Response:
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    return error_response(413, "payload_too_large", f"the body is larger than {limit} bytes")


# --- parsing --------------------------------------------------------------------------------

def _bad(message: str, code: str = "invalid_request") -> DispatchError:
    exc = DispatchError(message, code=code, status=422 if _protocol() == "tgi" else 400)
    exc.unrecorded = True  # type: ignore[attr-defined] - the handler audits it
    return exc


def _body() -> tuple[dict[str, Any], bytes]:
    raw = request.get_data(cache=False)  # bounded by MAX_CONTENT_LENGTH: 413 before this
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise _bad("the body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    if isinstance(body.get("model"), str):
        g.asked_model = body["model"][:200]
    return body, raw


def _int_field(obj: dict[str, Any], name: str, limit: int) -> None:
    value = obj.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(f"`{name}` must be a positive integer")
    if value > limit:
        raise _bad(f"`{name}` may be at most {limit}", "max_tokens_too_large")


def _actor():  # type: ignore[no-untyped-def]
    actor = g.get("actor")
    if actor is None:
        raise UnauthenticatedError("authentication required: send `Authorization: Bearer "
                                   "<API key or token>`", code="unauthenticated")
    return actor


def _headers_context() -> tuple[str | None, str | None]:
    data_class = request.headers.get(DATA_CLASS_HEADER) or None
    purpose = request.headers.get(PURPOSE_HEADER) or None
    for name, value in ((DATA_CLASS_HEADER, data_class), (PURPOSE_HEADER, purpose)):
        if value is not None and (len(value) > 50 or not value.replace("-", "").replace(
                "_", "").isalnum()):
            raise _bad(f"{name} must be a short identifier")
    return data_class, purpose


def _admit(actor: Actor, **asked: Any) -> Plan:
    """dispatch.admit(), again on fresh data while what it decided on went stale."""
    from charter.app import authenticate_request

    for _ in range(_MAX_STALE_RETRIES):
        try:
            return service.admit(actor, **asked)
        except StaleSnapshotError as exc:
            authenticate_request(exc.generation)  # the key may be revoked by now
            actor = _actor()
    raise service.record_refusal(actor, asked["serving_name"], DispatchError(
        "the registry is changing too fast to decide; try again", code="registry_busy",
        status=503, details={"retry_after_s": 1}))


# --- OpenAI ---------------------------------------------------------------------------------

@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    return _openai("/v1/chat/completions", required="messages", list_field=True)


@bp.post("/v1/completions")
def completions() -> Response:
    return _openai("/v1/completions", required="prompt", list_field=False)


def _openai(path: str, *, required: str, list_field: bool) -> Response:
    actor = _actor()
    body, raw = _body()
    settings = current_app.extensions["charter.settings"]
    name = _checked_name(body.get("model"))
    value = body.get(required)
    if value is None or (list_field and (not isinstance(value, list) or not value)):
        raise _bad(f"`{required}` is required")
    for field in ("max_tokens", "max_completion_tokens"):
        _int_field(body, field, settings.dispatch_max_new_tokens)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("`stream` must be a boolean")
    data_class, purpose = _headers_context()
    plan = _admit(actor, serving_name=name, data_class=data_class, purpose=purpose,
                  protocol="openai")
    return _forward(plan, path, body, raw, stream=stream, protocol="openai")


@bp.get("/v1/models")
def list_models() -> Response:
    actor = _actor()
    data = [{"id": d.serving_name, "object": "model", "created": int(d.created_at.timestamp()),
             "owned_by": "charter"} for d in service.visible_models(actor)]
    return Response(json.dumps({"object": "list", "data": data}), mimetype="application/json")


# --- TGI ------------------------------------------------------------------------------------

def _checked_name(name: object) -> str:
    """A serving name as callers may give it: what a deployment could be called."""
    if not isinstance(name, str) or not name:
        raise _bad("`model` is required")
    if len(name) > 200 or not name.isprintable():
        raise _bad("`model` must be at most 200 printable characters", "invalid_model_name")
    return name


def _serving_name(name: str | None) -> str:
    name = name or request.headers.get(MODEL_HEADER)
    if name:
        return _checked_name(name)
    visible = service.visible_models(_actor())
    if len(visible) == 1:
        return visible[0].serving_name
    raise _bad(f"name the model: use /tgi/<model>/... or the {MODEL_HEADER} header",
               "model_required")


def _tgi(route: str, name: str | None) -> Response:
    actor = _actor()
    body, raw = _body()
    settings = current_app.extensions["charter.settings"]
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise _bad("`inputs` must be a non-empty string")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("`parameters` must be an object")
    _int_field(params, "max_new_tokens", settings.dispatch_max_new_tokens)
    stream = route == "/generate_stream" or (route == "/" and body.get("stream") is True)
    if route == "/" and not isinstance(body.get("stream", False), bool):
        raise _bad("`stream` must be a boolean")
    data_class, purpose = _headers_context()
    plan = _admit(actor, serving_name=_serving_name(name), data_class=data_class,
                  purpose=purpose, protocol="tgi")
    return _forward(plan, route, body, raw, stream=stream, protocol="tgi")


@bp.post("/generate")
@bp.post("/tgi/<name>/generate")
def generate(name: str | None = None) -> Response:
    return _tgi("/generate", name)


@bp.post("/generate_stream")
@bp.post("/tgi/<name>/generate_stream")
def generate_stream(name: str | None = None) -> Response:
    return _tgi("/generate_stream", name)


@bp.post("/")
@bp.post("/tgi/<name>/")
@bp.post("/tgi/<name>")
def compat(name: str | None = None) -> Response:
    return _tgi("/", name)


@bp.get("/info")
@bp.get("/tgi/<name>/info")
def info(name: str | None = None) -> Response:
    """TGI's Info for the named model, as the deployment knows it (no node is called)."""
    serving = _serving_name(name)
    if serving not in {d.serving_name for d in service.visible_models(_actor())}:
        raise DispatchError(f"the model {serving!r} does not exist", code="model_not_found",
                            status=404)
    from charter import __version__

    body = {"model_id": serving, "model_sha": None, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": 128, "max_best_of": 1, "max_stop_sequences": 4,
            "max_input_tokens": 4096, "max_total_tokens": 8192, "validation_workers": 1,
            "max_client_batch_size": 1, "router": "charter", "version": __version__,
            "sha": None, "docker_label": None}
    return Response(json.dumps(body), mimetype="application/json")


# --- proxy ----------------------------------------------------------------------------------

def _stream_error(protocol: str, message: str) -> bytes:
    if protocol == "openai":
        payload = {"error": {"message": message, "type": "api_error", "param": None,
                             "code": "node_failed"}}
    else:
        payload = {"error": message, "error_type": "node_failed"}
    return f"data: {json.dumps(payload)}\n\n".encode()


def _forward(plan: Plan, path: str, body: dict[str, Any], raw: bytes, *, stream: bool,
             protocol: str) -> Response:
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()  # of the bytes the caller sent
    pool, policy = _nodes()
    headers = {"Content-Type": "application/json", "X-Request-Id": g.get("request_id", "")}
    last_error = "no node answered"
    for node in plan.nodes:  # retry on another node only before the first byte
        payload = upstream.payload_for(node, protocol, body, raw)
        OUTSTANDING.acquire(node.id)
        started = time.perf_counter()
        try:
            resp = upstream.send(pool, policy, node, path, payload, headers)
        except (NodeCallError, CharterError, upstream.NodeRefused) as exc:
            OUTSTANDING.release(node.id)
            last_error = str(exc) if isinstance(exc, upstream.NodeRefused) else (
                f"{node.name}: {type(exc).__name__}")
            log.warning("node unreachable, trying the next", node=node.name, error=str(exc))
            continue
        if not stream or resp.status != 200:
            return _finish_whole(plan, node, resp, protocol, digest, stream, started)
        return _stream(plan, node, resp, protocol, digest, started)
    service.record_outcome(plan, node=None, outcome="failed", status=503, tokens_in=0,
                           tokens_out=0, ttft_ms=None, request_digest=digest, stream=stream,
                           error=last_error)
    raise DispatchError("no node could take the request", code="nodes_unavailable",
                        details={"last_error": last_error})


def _finish_whole(plan: Plan, node: NodeTarget, resp: NodeResponse, protocol: str,
                  digest: str, stream: bool, started: float) -> Response:
    try:
        content = resp.read()
    except NodeCallError as exc:
        service.record_outcome(plan, node=node, outcome="aborted", status=502, tokens_in=0,
                               tokens_out=0, ttft_ms=None, request_digest=digest,
                               stream=stream, error=str(exc))
        raise DispatchError("the model node failed while answering", code="node_failed",
                            status=502) from exc
    finally:
        OUTSTANDING.release(node.id)
    try:
        parsed = json.loads(content)
    except ValueError:
        parsed = None
    tokens_in, tokens_out = upstream.usage(protocol, parsed)
    ok = resp.status == 200
    service.record_outcome(plan, node=node, outcome="completed" if ok else "failed",
                           status=resp.status, tokens_in=tokens_in,
                           tokens_out=tokens_out,
                           ttft_ms=round((time.perf_counter() - started) * 1000, 2),
                           request_digest=digest, stream=stream,
                           error="" if ok else content[:300].decode("utf-8", "replace"))
    out = Response(content, status=resp.status,
                   mimetype=resp.headers.get("content-type", "application/json"))
    out.headers["X-Charter-Decision-Id"] = plan.decision.decision_id
    return out


def _stream(plan: Plan, node: NodeTarget, resp: NodeResponse, protocol: str, digest: str,
            started: float) -> Response:
    request_id = g.get("request_id")  # the outcome is recorded after the request's context
    def events() -> Iterator[bytes]:
        ttft: float | None = None
        count = 0
        outcome, error = "completed", ""
        try:
            for chunk in resp.iter_raw():
                if ttft is None:
                    ttft = round((time.perf_counter() - started) * 1000, 2)
                count += chunk.count(b"data:") - chunk.count(b"data: [DONE]")
                yield chunk
        except NodeCallError as exc:
            outcome, error = "aborted", str(exc)
            yield _stream_error(protocol, "the model node failed mid-stream")
        except GeneratorExit:
            outcome, error = "cancelled", "the client went away"
            raise
        finally:
            resp.close()  # unless read to the end, closing the connection cancels generation
            OUTSTANDING.release(node.id)
            service.record_outcome(plan, node=node, outcome=outcome, status=200, tokens_in=0,
                                   tokens_out=count, ttft_ms=ttft, request_digest=digest,
                                   stream=True, error=error, request_id=request_id)

    out = Response(stream_with_context(events()), status=200, mimetype="text/event-stream")
    out.headers["Cache-Control"] = "no-cache"
    out.headers["X-Accel-Buffering"] = "no"
    out.headers["X-Charter-Decision-Id"] = plan.decision.decision_id
    return out
