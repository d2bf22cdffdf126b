"""OpenAI- and TGI-compatible endpoints: parse, plan, proxy with streaming, record.

Real clients call these unchanged: the `openai` client (`/v1/...`) and TGI's and TEI's
clients (`huggingface_hub.InferenceClient`, which posts to its base URL). TGI and TEI
routes need a serving name: `/tgi/<name>/...` or `/tei/<name>/...` (give
`base_url=<charter>/tgi/<name>` to the client), or the `X-Charter-Model` header on the bare
routes. `POST /` of either answers as the model's task says: TGI's generation for a
generation model, TEI's embeddings for an embedding one. Errors use each protocol's own
error shape.

The dispatch routes (every POST here) are handlers of an `Exchange`, answered by their own
WSGI path in front of Flask (charter.dispatch.wsgi, which routes them); the two reads,
`GET /v1/models` and TGI's `/info`, are Flask views.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import structlog
from flask import Blueprint, Response, g, request
from werkzeug.http import http_date
from werkzeug.utils import get_content_type

from charter import __version__, scope
from charter.actor import Actor
from charter.dispatch import service, upstream
from charter.dispatch.protocol import (
    MODEL_HEADER,
    Answer,
    Exchange,
    caller,
    malformed_for,
    records_malformed,
    render_error,
)
from charter.dispatch.service import DispatchError, Plan
from charter.errors import CharterError
from charter.identity import authn
from charter.nodes.client import NodeCallError, NodeResponse
from charter.nodes.service import NodeTarget
from charter.readcache import StaleReadError
from charter.relay import JOB_KEY, RELAY_KEY, Job, PumpFailed

log = structlog.get_logger("charter.gateway")
bp = Blueprint("gateway", __name__)
bp.register_error_handler(CharterError, render_error)
_MAX_STALE_RETRIES = 5


# --- parsing --------------------------------------------------------------------------------

def _body(ex: Exchange) -> tuple[dict[str, Any], bytes]:
    raw = ex.body()  # bounded: 413 past max_body_bytes
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ex.malformed("the body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise ex.malformed("the body must be a JSON object")
    if isinstance(body.get("model"), str):
        ex.asked_model = body["model"][:200]
    return body, raw


def _no_adapter_field(ex: Exchange, body: dict[str, Any]) -> None:
    """A field that would pick adapter weights no one approved (service.ADAPTER_FIELDS)."""
    found = service.adapter_field(body)
    if found is not None:
        raise ex.malformed(f"`{found}` is not accepted: an adapter is a model version of "
                           "its own; send to its serving name instead", "adapter_id_not_allowed")


def _int_field(ex: Exchange, obj: dict[str, Any], name: str, limit: int,
               code: str = "max_tokens_too_large") -> None:
    value = obj.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ex.malformed(f"`{name}` must be a positive integer")
    if value > limit:
        raise ex.malformed(f"`{name}` may be at most {limit}", code)


def _admit(ex: Exchange, **asked: Any) -> Plan:
    """dispatch.admit(), again on fresh data while what it decided on went stale (the
    caller is authenticated again on each new generation: the key may be revoked by now)."""
    for _ in range(_MAX_STALE_RETRIES):
        try:
            return service.admit(ex.ctx, **asked)
        except StaleReadError as exc:
            actor = authn.authenticate(ex.ctx, ex.headers.get("Authorization", ""),
                                       generation=exc.generation)
            ex.ctx, ex.actor = ex.ctx.with_actor(actor, exc.generation), actor
            ex.caller()
    raise service.record_refusal(ex.caller(), asked["serving_name"], DispatchError(
        "the registry is changing too fast to decide; try again", code="registry_busy",
        status=503, details={"retry_after_s": 1}))


def _limited(ex: Exchange, asked: dict[str, Any], path: str, body: dict[str, Any],
             raw: bytes, *, stream: bool) -> Answer:
    """The request's limits first (charter.dispatch.service.limit), then the decision and
    the call; a request that fails or is refused after its limits admitted it gives its
    stream's lease back (its outcome charges its tokens)."""
    task = asked.get("task", "generation")
    asked = {**asked, "content": service.Asked(asked["protocol"], body, task)}
    limits = service.limit(ex.ctx, serving_name=asked["serving_name"], stream=stream)
    try:
        plan = _admit(ex, **asked, limits=limits)
    except BaseException:
        if limits is not None:
            limits.release()
        raise
    try:
        return _forward(ex, plan, asked, path, body, raw, stream=stream)
    except BaseException:
        service.settle(plan.ticket)
        raise


# --- OpenAI ---------------------------------------------------------------------------------

def chat_completions(ex: Exchange, _name: str | None) -> Answer:
    return _openai(ex, "/v1/chat/completions", required="messages", list_field=True)


def completions(ex: Exchange, _name: str | None) -> Answer:
    return _openai(ex, "/v1/completions", required="prompt", list_field=False)


def _openai(ex: Exchange, path: str, *, required: str, list_field: bool) -> Answer:
    ex.caller()  # authenticated before the body is read
    body, raw = _body(ex)
    settings = scope.current().settings
    name = _checked_name(ex.protocol, body.get("model"))
    value = body.get(required)
    if value is None or (list_field and (not isinstance(value, list) or not value)):
        raise ex.malformed(f"`{required}` is required")
    _no_adapter_field(ex, body)
    for field in ("max_tokens", "max_completion_tokens"):
        _int_field(ex, body, field, settings.dispatch_max_new_tokens)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ex.malformed("`stream` must be a boolean")
    data_class, purpose = ex.labels()
    asked = {"serving_name": name, "data_class": data_class, "purpose": purpose,
             "protocol": "openai"}
    return _limited(ex, asked, path, body, raw, stream=stream)


@bp.get("/v1/models")
def list_models() -> Response:
    actor = caller()
    data = [{"id": d.serving_name, "object": "model", "created": int(d.created_at.timestamp()),
             "owned_by": "charter"} for d in service.visible_models(actor)]
    return Response(json.dumps({"object": "list", "data": data}), mimetype="application/json")


# --- embeddings -----------------------------------------------------------------------------

def _embedding_inputs(ex: Exchange, value: object, field: str, *, ids: bool) -> None:
    problem = service.embedding_inputs_problem(value, field, ids=ids)
    if problem is not None:
        raise ex.malformed(*problem)


def embeddings(ex: Exchange, _name: str | None) -> Answer:
    ex.caller()  # authenticated before the body is read
    body, raw = _body(ex)
    name = _checked_name(ex.protocol, body.get("model"))
    _embedding_inputs(ex, body.get("input"), "input", ids=True)
    _no_adapter_field(ex, body)
    if body.get("encoding_format") not in (None, "float", "base64"):
        raise ex.malformed("`encoding_format` must be float or base64")
    _int_field(ex, body, "dimensions", 65_536, "dimensions_too_large")
    data_class, purpose = ex.labels()
    asked = {"serving_name": name, "data_class": data_class, "purpose": purpose,
             "protocol": "openai", "task": "embedding"}
    return _limited(ex, asked, "/v1/embeddings", body, raw, stream=False)


def embed(ex: Exchange, name: str | None) -> Answer:
    """TEI's `/embed`: `inputs` a text or texts; `normalize`, `truncate` passed on."""
    ex.caller()  # authenticated before the body is read
    body, raw = _body(ex)
    _embedding_inputs(ex, body.get("inputs"), "inputs", ids=False)
    for flag in ("normalize", "truncate"):  # TEI's Option<bool>: null is its default
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise ex.malformed(f"`{flag}` must be a boolean")
    data_class, purpose = ex.labels()
    asked = {"serving_name": _serving_name(ex, name), "data_class": data_class,
             "purpose": purpose, "protocol": "tei", "task": "embedding"}
    return _limited(ex, asked, "/embed", body, raw, stream=False)


# --- TGI ------------------------------------------------------------------------------------

def _checked_name(protocol: str, name: object) -> str:
    """A serving name as callers may give it: what a deployment could be called."""
    if not isinstance(name, str) or not name:
        raise malformed_for(protocol, "`model` is required")
    if len(name) > 200 or not name.isprintable():
        raise malformed_for(protocol, "`model` must be at most 200 printable characters",
                            "invalid_model_name")
    return name


def _serving_name(ex: Exchange, name: str | None) -> str:
    return _named(name or ex.headers.get(MODEL_HEADER), ex.caller())


def _named(name: str | None, actor: Actor) -> str:
    """The serving name of a TGI or TEI route (their error shape): the path's or the
    header's (`name`), or the one model the caller can see."""
    if name:
        return _checked_name("tgi", name)
    visible = service.visible_models(actor)
    if len(visible) == 1:
        return visible[0].serving_name
    raise malformed_for("tgi", f"name the model: use /tgi/<model>/... or the {MODEL_HEADER} "
                        "header", "model_required")


def _tgi(ex: Exchange, route: str, name: str | None) -> Answer:
    ex.caller()  # authenticated before the body is read
    body, raw = _body(ex)
    settings = scope.current().settings
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise ex.malformed("`inputs` must be a non-empty string")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise ex.malformed("`parameters` must be an object")
    _int_field(ex, params, "max_new_tokens", settings.dispatch_max_new_tokens)
    _no_adapter_field(ex, body)
    stream = route == "/generate_stream" or (route == "/" and body.get("stream") is True)
    if route == "/" and not isinstance(body.get("stream", False), bool):
        raise ex.malformed("`stream` must be a boolean")
    data_class, purpose = ex.labels()
    asked = {"serving_name": _serving_name(ex, name), "data_class": data_class,
             "purpose": purpose, "protocol": "tgi"}
    return _limited(ex, asked, route, body, raw, stream=stream)


def generate(ex: Exchange, name: str | None) -> Answer:
    return _tgi(ex, "/generate", name)


def generate_stream(ex: Exchange, name: str | None) -> Answer:
    return _tgi(ex, "/generate_stream", name)


def compat(ex: Exchange, name: str | None) -> Answer:
    """What TGI's and TEI's clients post to their base URL: generation or embeddings, as
    the model's task says (an unknown name goes on to be refused, model_not_found)."""
    ex.caller()
    if service.task_of(ex.ctx, _serving_name(ex, name)) == "embedding":
        return embed(ex, name)
    return _tgi(ex, "/", name)


@bp.get("/info")
@bp.get("/tgi/<name>/info")
@bp.get("/tei/<name>/info")
@records_malformed
def info(name: str | None = None) -> Response:
    """TGI's Info for the named model, as the deployment knows it (no node is called)."""
    actor = caller()
    serving = _named(name or request.headers.get(MODEL_HEADER), actor)
    if serving not in {d.serving_name for d in service.visible_models(actor)}:
        raise DispatchError(f"the model {serving!r} does not exist", code="model_not_found",
                            status=404)
    task = service.task_of(g.ctx, serving)
    body = {"model_id": serving, "model_sha": None,
            "model_pipeline_tag": "feature-extraction" if task == "embedding"
            else "text-generation",
            "max_concurrent_requests": 128, "max_best_of": 1, "max_stop_sequences": 4,
            "max_input_tokens": 4096, "max_total_tokens": 8192, "validation_workers": 1,
            "max_client_batch_size": 1, "router": "charter", "version": __version__,
            "sha": None, "docker_label": None}
    return Response(json.dumps(body), mimetype="application/json")


# --- proxy ----------------------------------------------------------------------------------

def _stream_error(protocol: str, message: str) -> bytes:
    payload = upstream.error_body(protocol, message, code="node_failed")
    return f"data: {json.dumps(payload)}\n\n".encode()


def _forward(ex: Exchange, plan: Plan, asked: dict[str, Any], path: str,
             body: dict[str, Any], raw: bytes, *, stream: bool) -> Answer:
    """Send to the plan's nodes in turn; when every one of them failed before the first
    byte, decide again without them (any region the policy allows: a new decision, audited,
    the failed one's outcome recorded) and go on. Never after the first byte."""
    protocol = asked["protocol"]
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()  # of the bytes the caller sent
    rt = scope.current()
    pool, policy, outstanding = rt.node_pool, rt.node_urls, rt.outstanding
    headers = {"Content-Type": "application/json", "X-Request-Id": ex.request_id}
    tried: set[str] = set()
    while True:
        # The body as the decision has it sent: the caller's, or with its findings replaced.
        asked_body = body if plan.body is None else plan.body
        sent, sent_raw, strip_usage = upstream.outgoing(
            protocol, asked_body, raw if plan.body is None else json.dumps(plan.body).encode(),
            stream=stream)
        last_error = "no node answered"
        for node in plan.nodes:
            tried.add(node.id)
            payload = upstream.payload_for(node, protocol, sent, sent_raw)
            outstanding.acquire(node.id)
            started = time.perf_counter()
            try:
                with rt.tracing.span("charter.node.call", **{
                        "charter.node": node.name, "charter.region": node.region}):
                    sent_headers = dict(headers)
                    rt.tracing.inject(sent_headers)  # the node continues the trace
                    resp = upstream.send(pool, policy, node, path, payload, sent_headers)
            except (NodeCallError, CharterError, upstream.NodeRefused) as exc:
                outstanding.release(node.id)
                last_error = str(exc) if isinstance(exc, upstream.NodeRefused) else (
                    f"{node.name}: {type(exc).__name__}: {exc}")
                log.warning("node failed before the first byte, trying the next",
                            node=node.name, error=str(exc))
                upstream.count_failure(node, exc)
                if isinstance(exc, NodeCallError):  # refused, reset or timed out
                    upstream.suspect(node, last_error)
                continue
            if not stream or resp.status != 200:
                return _finish_whole(ex, plan, node, resp, protocol, asked_body, digest,
                                     stream, started, original=body)
            return _stream(ex, plan, node, resp, protocol, asked_body, digest, started,
                           strip_usage, original=body)
        service.record_outcome(plan, node=None, outcome="failed", status=503, tokens_in=0,
                               tokens_out=0, ttft_ms=None, request_digest=digest,
                               stream=stream, error=last_error, final=False)
        try:
            plan = _admit(ex, **asked, exclude=frozenset(tried),
                          retry_of=plan.decision.decision_id, ticket=plan.ticket)
        except DispatchError as exc:
            if exc.code == "nodes_unavailable":
                exc.details["last_error"] = last_error
            raise


def _finish_whole(ex: Exchange, plan: Plan, node: NodeTarget, resp: NodeResponse,
                  protocol: str, body: dict[str, Any], digest: str, stream: bool,
                  started: float, *, original: dict[str, Any]) -> Answer:
    """A whole answer (or a node's refusal) passed on; `body`: what was sent, `original`:
    what the caller sent (a capture records it)."""
    try:
        content = resp.read()
    except NodeCallError as exc:
        service.record_outcome(plan, node=node, outcome="aborted", status=502, tokens_in=0,
                               tokens_out=0, ttft_ms=None, request_digest=digest,
                               stream=stream, error=str(exc))
        raise DispatchError("the model node failed while answering", code="node_failed",
                            status=502) from exc
    finally:
        scope.current().outstanding.release(node.id)
    try:
        parsed = json.loads(content)
    except ValueError:
        parsed = None
    headed = upstream.header_usage(resp.headers) if protocol == "tgi" else None
    ok = resp.status == 200
    tokens = service.Counted(0, 0)  # a refusal by the node generated nothing
    if ok and plan.task == "embedding":
        tokens = service.counted_embedding(plan, protocol, body, parsed, resp.headers)
    elif ok:
        tokens = service.counted_whole(plan, protocol, body, parsed, headed)
    ttft_ms = round((time.perf_counter() - started) * 1000, 2)
    answer_redacted: dict[str, int] = {}
    if ok and plan.redact_response and plan.task == "generation":
        try:
            content, answer_redacted = service.redacted_answer(plan, protocol, content)
        except DispatchError as exc:  # inspection cannot run: the answer is not passed on
            service.record_outcome(plan, node=node, outcome="failed", status=exc.status,
                                   tokens_in=tokens.tokens_in, tokens_out=tokens.tokens_out,
                                   estimated=tokens.estimated,
                                   estimated_by=tokens.estimated_by, ttft_ms=ttft_ms,
                                   request_digest=digest, stream=stream, error=exc.message)
            raise
    service.record_outcome(plan, node=node, outcome="completed" if ok else "failed",
                           status=resp.status, tokens_in=tokens.tokens_in,
                           tokens_out=tokens.tokens_out, estimated=tokens.estimated,
                           estimated_by=tokens.estimated_by, ttft_ms=ttft_ms,
                           request_digest=digest, stream=stream,
                           error="" if ok else content[:300].decode("utf-8", "replace"),
                           response_redacted=answer_redacted)
    if ok:
        service.keep(plan, protocol=protocol, body=original, parsed=parsed,
                     request_id=ex.request_id, response_redacted=answer_redacted)
    mimetype = resp.headers.get("content-type") or "application/json"
    if protocol == "openai" and ok:
        content = upstream.named_as_asked(content, plan.serving_name)
    elif not ok:  # a 4xx: the node refused the request itself
        content, mimetype = upstream.error_for_caller(protocol, node, content), "application/json"
    out = Answer(resp.status, content, get_content_type(mimetype, "utf-8"))
    if headed is not None:  # TGI's own count headers, as a TGI client reads them
        out.headers["x-prompt-tokens"], out.headers["x-generated-tokens"] = map(str, headed)
    out.headers["X-Charter-Decision-Id"] = plan.decision.decision_id
    _redactions(out, plan)
    if answer_redacted:
        out.headers["X-Charter-Response-Redacted"] = _counts(answer_redacted)
    _deprecation(out, plan)
    return out


def _counts(found: dict[str, int]) -> str:
    return ", ".join(f"{kind}={n}" for kind, n in sorted(found.items()))


def _redactions(out: Answer, plan: Plan) -> None:
    """The caller is told what was replaced in its request before it was sent
    (`X-Charter-Redacted: EMAIL_ADDRESS=2, IP_ADDRESS=1`): the answer it reads is to a
    request that differs from the one it wrote."""
    if plan.redacted:
        out.headers["X-Charter-Redacted"] = _counts(plan.redacted)


def _deprecation(out: Answer, plan: Plan) -> None:
    """A deprecated version's answer says so: `Deprecation` (RFC 9745, when it was
    deprecated) and `Sunset` (RFC 8594, when its approval ends: no answer after that)."""
    if plan.deprecated_at is None:
        return
    out.headers["Deprecation"] = f"@{plan.deprecated_at}"
    if plan.sunset is not None:
        out.headers["Sunset"] = http_date(plan.sunset)


class _StreamPump:
    """What a streamed answer goes through on its way to the caller, and how its end is
    recorded: the same for the worker's relay (charter.relay, no thread per stream) and
    for the generator below (the test client, HTTP/1.0 or TLS callers)."""

    def __init__(self, plan: Plan, node: NodeTarget, protocol: str, body: dict[str, Any],
                 digest: str, started: float, strip_usage: bool, *,
                 original: dict[str, Any], request_id: str) -> None:
        self.plan, self.node, self.protocol, self.body = plan, node, protocol, body
        self.digest, self.started, self.original = digest, started, original
        self.rt = scope.current()  # the outcome is recorded after the request: bound again
        self.request_id = request_id
        self.ttft: float | None = None
        self.passing = upstream.StreamFilter(protocol, plan.serving_name,
                                             strip_usage=strip_usage,
                                             redactor=service.answer_redactor(plan))

    def first_byte(self) -> None:
        self.ttft = round((time.perf_counter() - self.started) * 1000, 2)

    def feed(self, data: bytes) -> bytes:
        try:
            return self.passing.feed(data)
        except service.InspectionUnavailableError as exc:  # the answer's redaction
            raise self._inspection_failed(exc) from exc

    def rest(self) -> bytes:
        try:
            return self.passing.rest()
        except service.InspectionUnavailableError as exc:
            raise self._inspection_failed(exc) from exc

    @staticmethod
    def _inspection_failed(exc: Exception) -> PumpFailed:
        return PumpFailed("the answer must be inspected, and inspection failed mid-stream",
                          f"inspection failed: {type(exc).__name__}: {exc}")

    def error_event(self, message: str) -> bytes:
        return _stream_error(self.protocol, message)

    def finish(self, outcome: str, error: str) -> None:
        """The node's connection is closed or back in the pool: count and record."""
        plan, passing = self.plan, self.passing
        self.rt.outstanding.release(self.node.id)
        redacted = dict(sorted(sum((r.counts for r in passing.redactors.values()),
                                   Counter()).items()))
        with scope.bound(self.rt, request_id=self.request_id):
            tokens = service.counted(
                plan, self.protocol, self.body, passing.tokens_in, passing.tokens_out,
                passing.text, events=passing.events if self.protocol == "tgi" else None)
            service.record_outcome(
                plan, node=self.node, outcome=outcome, status=200,
                tokens_in=tokens.tokens_in, tokens_out=tokens.tokens_out,
                estimated=tokens.estimated, estimated_by=tokens.estimated_by,
                ttft_ms=self.ttft, request_digest=self.digest, stream=True, error=error,
                request_id=self.request_id, response_redacted=redacted)
            if plan.capture is not None:  # the text is read only for a capture
                service.keep(plan, protocol=self.protocol, body=self.original,
                             answer=passing.text(), request_id=self.request_id,
                             response_redacted=redacted)


def _stream(ex: Exchange, plan: Plan, node: NodeTarget, resp: NodeResponse, protocol: str,
            body: dict[str, Any], digest: str, started: float, strip_usage: bool, *,
            original: dict[str, Any]) -> Answer:
    pump = _StreamPump(plan, node, protocol, body, digest, started, strip_usage,
                       original=original, request_id=ex.request_id)
    if ex.environ.get(RELAY_KEY) is not None:
        # The worker's relay takes both sockets once this response's head is written.
        ex.environ[JOB_KEY] = Job(resp.detach(), pump, scope.current().node_pool.read_timeout)
        body_iter: Iterator[bytes] = iter(())
    else:
        body_iter = _events(pump, resp)
    out = Answer(200, body_iter, "text/event-stream; charset=utf-8", {
        "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
        "X-Charter-Decision-Id": plan.decision.decision_id})
    _redactions(out, plan)
    _deprecation(out, plan)
    return out


def _events(pump: _StreamPump, resp: NodeResponse) -> Iterator[bytes]:
    """The stream on this thread, as a generator: how a stream ends is decided as the
    relay decides it (charter.relay)."""
    outcome, error = "completed", ""
    try:
        for chunk in resp.iter_raw():
            if pump.ttft is None:
                pump.first_byte()
            out = pump.feed(chunk)
            if out:
                yield out
        if rest := pump.rest():
            yield rest
    except NodeCallError as exc:
        outcome, error = "aborted", str(exc)
        yield pump.error_event("the model node failed mid-stream")
    except PumpFailed as exc:
        outcome, error = "aborted", str(exc)
        yield pump.error_event(exc.message)
    except GeneratorExit:
        outcome, error = "cancelled", "the client went away"
        raise
    finally:
        resp.close()  # unless read to the end, closing the connection cancels generation
        pump.finish(outcome, error)
