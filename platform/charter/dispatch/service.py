"""The governed request path: resolve, check quota, decide by policy, choose a node, record.

No Flask here: the gateway (gateway.py) parses the caller's protocol and streams; this
module decides where a request may go and writes what happened.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from charter import identifiers, scope
from charter.actor import Actor
from charter.audit.journal import Event
from charter.audit.writer import Entry
from charter.context import RequestContext
from charter.db import utcnow
from charter.dispatch import upstream
from charter.dispatch.balance import only_regional, regions_in_order
from charter.errors import CharterError
from charter.identity.teams import CallerContext, caller_context, key_limits
from charter.inspection import captures
from charter.inspection.captures import RunningCapture
from charter.inspection.detect import Detector, Replacer
from charter.inspection.detect import (  # what a redacted stream raises: for the gateway
    InspectionUnavailableError as InspectionUnavailableError,
)
from charter.inspection.stream import StreamRedactor
from charter.metering import quota as quotas
from charter.metering.limits import Limits, LimitsUnavailableError, Pending, Rule, rules_for
from charter.metering.service import UsageDelta
from charter.metering.tokens import TokenizerPin, Tokenizers, answer_of, inputs_of, prompt_of
from charter.nodes import service as nodes
from charter.nodes.service import NodeTarget
from charter.policy import service as policy
from charter.policy.engine import Decision, PolicyUnavailableError
from charter.readcache import StaleReadError
from charter.registry import service as registry
from charter.tracing import set_attributes
from charter.uow import unit_of_work

if TYPE_CHECKING:
    from charter.runtime import Runtime

log = structlog.get_logger("charter.dispatch")


class DispatchError(CharterError):
    """A refusal on the gateway; rendered in the caller's protocol (OpenAI or TGI).
    `malformed`: the request could not be parsed; the view layer records it
    (charter.dispatch.protocol.records_malformed)."""

    status = 503
    code = "dispatch_failed"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 details: dict[str, Any] | None = None, malformed: bool = False) -> None:
        super().__init__(message, code=code, status=status, details=details)
        self.malformed = malformed


@dataclass(frozen=True)
class Plan:
    actor: Actor
    serving_name: str
    deployment_id: str
    version_id: str
    model_name: str
    team_id: str
    team: str | None
    data_class: str
    purpose: str
    decision: Decision
    nodes: list[NodeTarget]
    started: datetime = field(default_factory=utcnow)
    # A deprecated version's answers say so (RFC 9745 Deprecation, RFC 8594 Sunset: the
    # approval's expiry), in seconds since the epoch.
    deprecated_at: int | None = None
    sunset: int | None = None
    ticket: Ticket | None = None  # what the request's limits admitted (limit())
    task: str = "generation"  # the version's: generation or embedding
    # The body to send when the decision obliged redaction (None: the caller's, as sent),
    # and how many findings of each type it replaced.
    body: dict[str, Any] | None = None
    redacted: dict[str, int] = field(default_factory=dict)
    # The team's investigation capture running when the request was admitted: the request
    # and its answer are recorded under it, encrypted (charter.inspection.captures).
    capture: RunningCapture | None = None

    @property
    def redact_response(self) -> tuple[str, ...]:
        """The finding types to replace in the answer (the decision's obligation)."""
        return self.decision.obligations.redact_response


@dataclass(frozen=True, slots=True)
class Ticket:
    """A request its limits admitted: the rules its tokens are charged to when it ends,
    and the lease a stream holds under a concurrent-streams limit."""

    rules: tuple[Rule, ...]  # only those settling changes: token limits, a stream's lease
    lease: str | None


CHARGED = ("tokens_per_minute", "tokens_per_day", "tokens_per_month")
STREAMS = "concurrent_streams"


def limit(rc: RequestContext, *, serving_name: str, stream: bool) -> Limited | None:
    """Ask the request's team's and key's limits before anything else is decided: sent
    now, its answer read by admit() just before the decision would be committed, so
    Redis works while the policy does (None: no limits apply). Limited.ticket() refuses
    it (429 `limit_exceeded`, naming the limit, with when to retry) or admits it, as if
    asked first: a refused request commits no decision. Every refusal is audited as
    `dispatch.refused`. When the limits' store cannot be asked, CHARTER_LIMITS_UNAVAILABLE
    decides: refuse (503 `limits_unavailable`) or serve unchecked; either way counted, and
    audited (`limits.unavailable`, at most once a minute a process, when served)."""
    actor = rc.actor
    assert actor is not None
    rt = scope.current()
    cache = rt.readcache
    ctx = cache.cached(rc.generation, ("caller", actor.user_id),
                       lambda: caller_context(actor.user_id))
    key_id = actor.key_id
    key_doc = cache.cached(rc.generation, ("key_limits", key_id),
                           lambda: key_limits(key_id)) if key_id else None
    if not ctx.limits and not key_doc:
        return None
    now_ms = int(time.time() * 1000)
    rules = cache.cached(  # the keys name the UTC day and month: made again when they turn
        rc.generation, ("limit_rules", actor.user_id, key_id, now_ms // 86_400_000),
        lambda: tuple(rules_for(ctx.team_id, Limits.of(ctx.limits), key_id,
                                Limits.of(key_doc), now_ms)))
    if not rules:
        return None
    lease = (secrets.token_hex(8)
             if stream and any(r.kind == "concurrent_streams" for r in rules) else None)
    try:
        pending = rt.limits.begin(list(rules), now_ms, lease, rt.settings.limits_stream_lease_s)
    except LimitsUnavailableError as exc:
        _unavailable(actor, serving_name, exc)
        return None
    return Limited(actor, ctx.team, serving_name, rules, lease, pending)


@dataclass(slots=True)
class Limited:
    """A request's limits, asked of the store; its answer read once (ticket())."""

    actor: Actor
    team: str | None
    serving_name: str
    rules: tuple[Rule, ...]
    lease: str | None
    pending: Pending
    answered: bool = False
    admitted: Ticket | None = None

    def ticket(self) -> Ticket | None:
        """What to settle when the request ends; or the refusal, raised (audited)."""
        if self.answered:
            return self.admitted
        self.answered = True
        try:
            refused = self.pending.result()
        except LimitsUnavailableError as exc:
            _unavailable(self.actor, self.serving_name, exc)
            return None
        if refused is not None:
            rule = refused.rule
            scope.current().counter(
                "charter_limit_refusals_total", "Requests refused by a limit, by limit "
                "(team.requests_per_minute, key.tokens_per_day, ...)", ("limit",)).labels(
                rule.name).inc()
            owner = (f"team {self.team}" if rule.name.startswith("team.")
                     else f"key {self.actor.key_id}")
            raise record_refusal(self.actor, self.serving_name, DispatchError(
                f"{owner} has reached its limit {rule.name} ({rule.limit}); retry after "
                f"{refused.retry_after_s} s", code="limit_exceeded", status=429,
                details={"limit": rule.name, "limit_value": rule.limit,
                         "retry_after_s": refused.retry_after_s}))
        self.admitted = self._charged()
        return self.admitted

    def _charged(self) -> Ticket:
        return Ticket(tuple(r for r in self.rules if r.kind in CHARGED or (
            self.lease and r.kind == STREAMS)), self.lease)

    def release(self) -> None:
        """A request that ended before its outcome (an error, another refusal): the
        answer is read (the connection kept), never recorded as a refusal of its own,
        and a lease it took is given back."""
        if not self.answered:
            self.answered = True
            try:
                refused = self.pending.result()
            except LimitsUnavailableError:
                return
            self.admitted = self._charged() if refused is None else None
        settle(self.admitted)


def _unavailable(actor: Actor, serving_name: str, exc: LimitsUnavailableError) -> None:
    """The limits could not be asked: served unchecked (said) or refused, by the setting."""
    settings = scope.current().settings
    count_unavailable(settings.limits_unavailable)
    if settings.limits_unavailable == "allow":
        _say_unavailable(actor, str(exc))
        return
    raise record_refusal(actor, serving_name, DispatchError(
        "the limits cannot be checked now, so the request is refused "
        "(CHARTER_LIMITS_UNAVAILABLE=refuse); try again", code="limits_unavailable",
        status=503, details={"retry_after_s": 1})) from None


def settle(ticket: Ticket | None, tokens: int = 0) -> None:
    """Charge what a request used to its limits and give its stream's lease back. With
    no tokens, only the lease: what a request that failed or was refused later does (any
    number of times: giving a lease back twice is harmless). Never raises and never
    waits: the store queues the charge (charter.metering.limits.RedisStore)."""
    if ticket is None or not ticket.rules or (not tokens and ticket.lease is None):
        return
    scope.current().limits.settle(list(ticket.rules), int(time.time() * 1000), tokens,
                                  ticket.lease)


def count_unavailable(action: str, n: int = 1, rt: Runtime | None = None) -> None:
    """Requests whose limits could not be checked (`refuse`, `allow`) or whose charges
    were dropped while Redis was away (`uncharged`)."""
    (rt or scope.current()).counter(
        "charter_limits_unavailable_total", "Requests whose limits could not be checked "
        "or charged (the limits' Redis away), by what was done", ("action",)).labels(
        action).inc(n)


def _say_unavailable(actor: Actor, error: str) -> None:
    """Audit that requests are served with their limits unchecked (at most once a
    minute a process: the event says so, the counter counts every one)."""
    rt = scope.current()
    now = time.monotonic()
    if rt.limits_unavailable_said and now - rt.limits_unavailable_said < 60:
        return
    rt.limits_unavailable_said = now
    rt.writer.defer(Entry(events=(Event.of(
        actor=actor.ref, action="limits.unavailable", target_type="limits",
        target_id="redis", outcome="failure",
        details={"error": error[:300], "action": "allow",
                 "message": "requests are served with their limits unchecked "
                            "(CHARTER_LIMITS_UNAVAILABLE=allow)"}),)))


def visible_models(actor: Actor) -> list[nodes.ActiveDeployment]:
    """Active deployments of servable versions that the caller's teams are entitled to."""
    allowed = set(caller_context(actor.user_id).entitlements.models)
    with unit_of_work():  # one snapshot of both domains' rows
        active = nodes.active_deployments()
        versions = registry.version_refs([d.version_id for d in active])
    out = []
    for d in active:
        v = versions.get(d.version_id)
        if v is not None and v.state in registry.SERVABLE and (
                "*" in allowed or d.serving_name in allowed or v.model_name in allowed):
            out.append(d)
    return out


@dataclass(frozen=True, slots=True)
class Route:
    """What a serving name leads to, as plain data (cached per generation: readcache)."""

    deployment_id: str
    version_id: str
    model_name: str
    version_doc: dict[str, Any]
    candidates: tuple[NodeTarget, ...]  # routable and attested for the version
    nodes_total: int
    deprecated_at: int | None = None
    task: str = "generation"  # generation or embedding: the endpoints that may serve it


def _load_route(serving_name: str, protocol: str) -> Route | None:
    with unit_of_work():  # one snapshot of both domains' rows
        found = nodes.deployment_route(serving_name, protocol)
        if found is None:
            return None
        version = registry.dispatch_view(found.version_id)
        assert version is not None  # a deployment's version is never deleted
        return Route(found.deployment_id, version.id, version.model_name, version.doc,
                     found.candidates, found.nodes_total, version.deprecated_at,
                     version.doc.get("task", "generation"))


def task_of(rc: RequestContext, serving_name: str) -> str | None:
    """The task of the version a serving name leads to (None: no such deployment), from
    the read cache: what a route shared by TGI's generation and TEI's embeddings (`POST
    /`) answers with."""
    route = _route(rc, serving_name, "tei")
    return route.task if route is not None else None


def _route(rc: RequestContext, serving_name: str, protocol: str) -> Route | None:
    return scope.current().readcache.cached(
        rc.generation, ("route", serving_name, protocol),
        lambda: _load_route(serving_name, protocol))


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's bound on a request's inputs (a node may allow fewer)


def embedding_inputs_problem(value: object, field: str, *,
                             ids: bool) -> tuple[str, str] | None:
    """Why `value` is no embedding request's inputs ((message, code)), or None: a text, or
    a list of texts (or, for OpenAI, token ids or lists of them), none empty, at most
    MAX_EMBEDDING_INPUTS. The gateway's and the batch lines' check."""
    def one(item: object) -> bool:
        if isinstance(item, str):
            return bool(item)
        return ids and isinstance(item, list) and bool(item) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item)

    if isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]  # one input given as token ids
    if not (one(value) or (isinstance(value, list) and value and all(one(v) for v in value))):
        what = "texts or token ids" if ids else "texts"
        return (f"`{field}` must be a non-empty text or a non-empty list of {what}, none of "
                "them empty", "invalid_request")
    if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
        return f"`{field}` may hold at most {MAX_EMBEDDING_INPUTS} inputs", "too_many_inputs"
    return None


# Request fields with which engines let a caller pick adapter weights per request (TGI's
# adapter_id, llama.cpp's lora, SGLang's lora_path, vLLM's lora_request): a caller never
# may; an approved adapter is a version of its own, named by Charter (upstream.payload_for).
ADAPTER_FIELDS = ("adapter_id", "adapters", "lora", "lora_path", "lora_request", "lora_name")


def adapter_field(body: dict[str, Any]) -> str | None:
    """The first adapter-selecting field a request names, TGI's in its `parameters`."""
    params = body.get("parameters")
    for holder in (body, params if isinstance(params, dict) else {}):
        for name in ADAPTER_FIELDS:
            if holder.get(name) is not None:
                return name
    return None


TASK_ENDPOINTS = {"generation": "text generation (chat, completions, TGI's generate)",
                  "embedding": "embeddings (POST /v1/embeddings, TEI's /embed)"}


def admit(rc: RequestContext, *, serving_name: str, data_class: str | None,
          purpose: str | None, protocol: str = "openai",
          origin: dict[str, Any] | None = None, exclude: frozenset[str] = frozenset(),
          retry_of: str | None = None, ticket: Ticket | None = None,
          limits: Limited | None = None, task: str = "generation",
          content: Asked | None = None) -> Plan:
    """Decide a request and commit the decision before anything is sent; or refuse it.

    The caller's context and the route come from the read cache (charter.readcache) of
    the request's generation; the decision events are committed through the group writer
    only if that generation is still current under the chain lock (otherwise
    StaleReadError: authenticate and decide again on the new one), and the day's request
    count of a team with a quota is checked and advanced in the same transaction. Every
    refusal is audited; nothing unrecorded is ever served. `origin` (e.g. a batch line's
    ids) goes into every event it writes.

    A failover (`retry_of`: the decision whose nodes all failed before the first byte)
    decides again without the nodes in `exclude`, in any region the policy allows; it is
    the same request, so it is not counted against the quota again.

    `limits` (limit()): their answer is read just before the commit; a refusal by them
    is raised instead, and nothing this call decided is committed.

    `task`: what the endpoint does (generation or embedding); a version of the other task
    is refused (`model_task_mismatch`, 400 in OpenAI's protocol, 422 in TGI's and TEI's).

    `content`: the request's body, read only when policy data says this team's, model's
    or data class's requests are inspected (data.charter.inspection); what is found (types
    and counts, never the text) goes into the dispatch input and the decision's event.
    Inspection that cannot run refuses the request (503 `inspection_unavailable`), and so
    does content it cannot read (400 `content_not_inspectable`: token ids). A decision that
    obliges redaction gives a plan with the body to send (Plan.body, Plan.redacted);
    findings it cannot replace refuse the request (`redaction_incomplete`).
    """
    if retry_of is not None:
        origin = {**(origin or {}), "retry_of": retry_of}
    actor = rc.actor
    assert actor is not None
    rt = scope.current()
    cache = rt.readcache
    ctx = cache.cached(rc.generation, ("caller", actor.user_id),
                       lambda: caller_context(actor.user_id))
    route = _route(rc, serving_name, protocol)
    events: list[Event] = []
    plan: Plan | None = None
    refusal: CharterError | None = None
    if route is None:
        refusal = DispatchError(f"the model {serving_name!r} does not exist",
                                code="model_not_found", status=404)
    elif route.task != task:
        article = "an" if route.task == "embedding" else "a"
        refusal = DispatchError(
            f"the model {serving_name!r} is {article} {route.task} model: it serves "
            f"{TASK_ENDPOINTS[route.task]}, not {TASK_ENDPOINTS[task]}",
            code="model_task_mismatch", status=400 if protocol == "openai" else 422,
            details={"model_task": route.task, "endpoint_task": task})
    elif exclude and not [n for n in route.candidates if n.id not in exclude]:
        refusal = DispatchError("no node could take the request", code="nodes_unavailable",
                                details={"nodes_tried": len(exclude)})
    elif not route.candidates:
        refusal = DispatchError("no attested, healthy node serves this model",
                                code="no_attested_node", details={"nodes": route.nodes_total})
    if refusal is not None:
        events.append(_refused_event(actor, serving_name, refusal, origin))
    else:
        assert route is not None
        data_class = data_class or ctx.default_data_class
        try:
            if exclude:
                route = replace(route, candidates=tuple(
                    n for n in route.candidates if n.id not in exclude))
            findings = _inspect(ctx, route, serving_name, data_class, content, protocol)
            plan, refusal = _decide(actor, ctx, route, serving_name, data_class,
                                    purpose or "assistant", events, origin, findings)
            if plan is not None and plan.decision.obligations.redact:
                assert content is not None  # findings to redact: the content was inspected
                plan, refusal = _redacting(plan, content)
            if plan is not None and ctx.team_id:
                running = cache.cached(rc.generation, ("capture", ctx.team_id),
                                       lambda: captures.running(ctx.team_id))
                if running is not None and running.running(utcnow()):
                    plan = replace(plan, capture=running)
            if refusal is not None:  # beside its denied decisions: one refusal a request
                events.append(_refused_event(actor, serving_name, refusal, origin))
        except PolicyUnavailableError as exc:
            events.extend(exc.events)
            exc.events = ()
            refusal = exc
        except DispatchError as exc:  # inspection refused it: no policy was asked
            refusal = exc
            events.append(_refused_event(actor, serving_name, exc, origin))
    entry = Entry(events=events, generation=rc.generation)
    quota = ctx.requests_per_day
    if plan is not None and retry_of is None:
        entry.usage = (UsageDelta(plan.team_id, serving_name, quotas.quota_day(utcnow()),
                                  requests=1, key_id=actor.key_id or ""),)
        if quota is not None:
            entry.quota = (plan.team_id, quota)
            over = _over_quota(ctx, quota)
            entry.over_quota = (*events, _refused_event(actor, serving_name, over, origin))
    if limits is not None:
        ticket = limits.ticket()  # raises the limits' refusal: nothing above is written
    with rt.tracing.span("charter.audit.commit") as span:
        rt.writer.commit(entry)
        set_attributes(span, **{"charter.audit.result": entry.result})
    if entry.result == "stale":
        assert entry.generation_seen is not None
        raise StaleReadError(entry.generation_seen)
    if entry.result == "failed":
        assert entry.error is not None
        raise entry.error
    if entry.result == "over_quota":
        assert quota is not None
        raise _over_quota(ctx, quota)
    if refusal is not None:
        raise refusal
    assert plan is not None
    return plan if ticket is None else replace(plan, ticket=ticket)


def record_refusal(actor: Actor, serving_name: str, exc: CharterError) -> CharterError:
    """Commit a refusal that no decision recorded (e.g. the registry kept changing)."""
    entry = scope.current().writer.commit(
        Entry(events=(_refused_event(actor, serving_name, exc),)))
    if entry.result == "failed":
        assert entry.error is not None
        return entry.error
    return exc


def _refused_event(actor: Actor, serving_name: str, exc: CharterError,
                   origin: dict[str, Any] | None = None) -> Event:
    key = {"key_id": actor.key_id} if actor.key_id else {}
    return Event.of(actor=actor.ref, action="dispatch.refused", target_type="deployment",
                    target_id=serving_name, outcome="denied",
                    details={"code": exc.code, "message": exc.message, **exc.details, **key,
                             **(origin or {})})


def _over_quota(ctx: CallerContext, quota: int) -> DispatchError:
    return DispatchError(
        f"team {ctx.team} has used its {quota} requests for today",
        code="quota_exceeded", status=429,
        details={"retry_after_s": quotas.seconds_until_reset(utcnow()),
                 "team": ctx.team, "requests_per_day": quota})


# A request's text for inspection: its texts, and whether some of it could not be read
# (token ids: no text to inspect).
Content = tuple[list[str], bool]


@dataclass(frozen=True, slots=True)
class Asked:
    """A request's body as its caller sent it, in its protocol, for inspection: its text,
    and the body with each text replaced (redaction)."""

    protocol: str
    body: dict[str, Any]
    task: str = "generation"

    def content(self) -> Content:
        return content_of(self.protocol, self.body, self.task)

    def replaced(self, replace: Callable[[str], str]) -> dict[str, Any]:
        return with_texts(self.protocol, self.body, self.task, replace)


def with_texts(protocol: str, body: dict[str, Any], task: str,
               replace: Callable[[str], str]) -> dict[str, Any]:
    """`body` with each text content_of() reads put through `replace`: chat messages'
    content (a string or its text parts), a completion's prompt (a string or strings),
    TGI's inputs, each embedding input. Token ids are left as they are; `body` is not
    changed (the containers on the way are copied)."""

    def texts(value: Any) -> Any:
        if isinstance(value, str):
            return replace(value)
        if isinstance(value, list):
            return [texts(v) if isinstance(v, str | list) else part(v) for v in value]
        return value

    def part(value: Any) -> Any:  # OpenAI's content part: {"type": "text", "text": ...}
        if isinstance(value, dict) and isinstance(value.get("text"), str):
            return {**value, "text": replace(value["text"])}
        return value

    out = dict(body)
    if task == "embedding":
        key = "input" if protocol == "openai" else "inputs"
        if key in out:
            out[key] = texts(out[key])
    elif protocol == "openai" and isinstance(body.get("messages"), list):
        out["messages"] = [{**m, "content": texts(m["content"])}
                           if isinstance(m, dict) and "content" in m else m
                           for m in body["messages"]]
    elif protocol == "openai":
        if "prompt" in out:
            out["prompt"] = texts(out["prompt"])
    elif "inputs" in out:
        out["inputs"] = texts(out["inputs"])
    return out


def content_of(protocol: str, body: dict[str, Any], task: str) -> Content:
    """What a request asks in text: chat messages' text parts, a completion's prompt,
    TGI's inputs, each embedding input; token ids are content Charter cannot read."""
    if task == "embedding":
        items = inputs_of(protocol, body)
        return [i for i in items if isinstance(i, str)], any(
            not isinstance(i, str) for i in items)
    given = body.get("prompt") if protocol == "openai" else None
    if isinstance(given, list) and given and all(isinstance(p, str) for p in given):
        return list(given), False  # several prompts, each a request of its own
    prompt = prompt_of(protocol, body)
    if isinstance(prompt, str):
        return [prompt], False
    if prompt and all(isinstance(p, int) for p in prompt):
        return [], True
    return [m["content"] for m in prompt if isinstance(m, dict)], False


def detector() -> Detector:
    """The runtime's detector (charter.inspection), built on first use."""
    return scope.current().part("inspection", lambda rt: Detector())


def warm_inspection(rt: Runtime) -> None:
    """Load Presidio in a serving process before its first request, where policy data
    inspects anything (a first inspected request would wait seconds for it). A detector
    that cannot load is logged; the requests it would inspect are refused
    (`inspection_unavailable`), as they would be without this."""
    if not rt.policies.inspection:
        return
    started = time.perf_counter()
    try:
        rt.part("inspection", lambda rt: Detector()).findings(["warm up: jane@example.com"])
    except Exception as exc:  # noqa: BLE001 - said, and refused request by request
        log.warning("content inspection cannot load: inspected requests will be refused",
                    error=f"{type(exc).__name__}: {exc}")
        return
    log.info("content inspection loaded", seconds=round(time.perf_counter() - started, 2))


def _inspection_failed(exc: Exception) -> DispatchError:
    scope.current().counter("charter_inspection_failures_total", "Requests refused because "
                            "content inspection could not run").inc()
    return DispatchError(
        f"this request's content must be inspected, and inspection cannot run: "
        f"{type(exc).__name__}: {str(exc)[:200]}", code="inspection_unavailable",
        status=503, details={"retry_after_s": 5})


def _inspect(ctx: CallerContext, route: Route, serving_name: str, data_class: str,
             content: Asked | None, protocol: str) -> dict[str, int] | None:
    """The findings of the request's content where policy data asks for inspection, else
    None (charter.inspection; data.charter.inspection.inspect)."""
    rt = scope.current()
    scope_ = rt.policies.inspection
    if content is None or not scope_.applies(ctx.team, (serving_name, route.model_name),
                                             data_class):
        return None
    texts, opaque = content.content()
    if opaque:
        raise DispatchError(
            "this request's content must be inspected, and part of it is token ids, which "
            "cannot be: send text", code="content_not_inspectable",
            status=400 if protocol == "openai" else 422)
    started = time.perf_counter()
    try:
        found = detector().findings(texts)
    except Exception as exc:  # noqa: BLE001 - fail closed, whatever broke
        raise _inspection_failed(exc) from None
    rt.histogram("charter_inspection_seconds", "Time to inspect a request's content",
                 ()).observe(time.perf_counter() - started)
    findings = rt.counter("charter_inspection_findings_total", "Findings in inspected "
                          "requests, by type (counts only)", ("type",))
    for kind, n in found.items():
        findings.labels(kind).inc(n)
    return found


def _redacting(plan: Plan, asked: Asked) -> tuple[Plan | None, DispatchError | None]:
    """The plan with the body to send: what the request carries of the types its decision
    obliges replaced by `<TYPE>` (charter.inspection.detect.Detector.redact), each text on
    its own. The body is inspected again: a finding still there (one split across a
    message's text parts, which are inspected joined) refuses the request."""
    types = plan.decision.obligations.redact
    found = detector()
    replacer = Replacer(found, types)
    try:
        sent = asked.replaced(replacer)
        left = sorted(set(found.findings(content_of(asked.protocol, sent, asked.task)[0]))
                      & set(types))
    except Exception as exc:  # noqa: BLE001 - fail closed, whatever broke
        return None, _inspection_failed(exc)
    if left:
        return None, DispatchError(
            f"this request must have its {', '.join(left)} replaced before it is sent, and "
            "some could not be (split across a message's text parts?): send each in one "
            "part", code="redaction_incomplete",
            status=400 if asked.protocol == "openai" else 422, details={"types": left})
    redactions = scope.current().counter(
        "charter_inspection_redactions_total", "Findings replaced before a request was "
        "sent, by type (counts only)", ("type",))
    for kind, n in replacer.counts.items():
        redactions.labels(kind).inc(n)
    return replace(plan, body=sent, redacted=dict(sorted(replacer.counts.items()))), None


def keep(plan: Plan, *, protocol: str, body: dict[str, Any], request_id: str | None,
         answer: str | None = None, parsed: Any = None,
         response_redacted: dict[str, int] | None = None) -> None:
    """Record the request and its answer under the capture it was admitted under, if any:
    the body as its caller sent it, the body sent when findings were replaced, the answer
    as the node generated it (`answer`, or the text of the whole answer `parsed`; an
    embedding's vectors are not kept). A record that cannot be written is logged and
    counted (charter_capture_failures_total): the caller was answered already."""
    if plan.capture is None:
        return
    rt = scope.current()
    if answer is None:
        answer = answer_of(protocol, parsed) if plan.task == "generation" else ""
    content = {"protocol": protocol, "task": plan.task, "request": body, "answer": answer,
               "team": plan.team, "data_class": plan.data_class, "purpose": plan.purpose,
               **({"sent": plan.body, "redacted": plan.redacted} if plan.redacted else {}),
               **({"response_redacted": response_redacted} if response_redacted else {})}
    try:
        captures.seal(plan.capture, serving_name=plan.serving_name,
                      decision_id=plan.decision.decision_id, request_id=request_id,
                      content=content)
    except Exception as exc:  # noqa: BLE001 - counted and said; the answer went out
        rt.counter("charter_capture_failures_total", "Captured requests whose record could "
                   "not be written").inc()
        log.error("a captured request could not be recorded", capture_id=plan.capture.id,
                  decision_id=plan.decision.decision_id,
                  error=f"{type(exc).__name__}: {str(exc)[:200]}")
        return
    rt.counter("charter_capture_records_total", "Requests recorded under an investigation "
               "capture").inc()


def answer_redactor(plan: Plan) -> Callable[[], StreamRedactor] | None:
    """What redacts a streamed answer's text, one per choice, when the decision obliges it
    (Plan.redact_response), else None."""
    types = plan.redact_response
    if not types:
        return None
    found = detector()
    return lambda: StreamRedactor(found, types)


def redacted_answer(plan: Plan, protocol: str, content: bytes) -> tuple[bytes, dict[str, int]]:
    """A whole answer with what it carries of the types the decision obliges replaced, and
    how many of each were (upstream.redacted_answer). Raises DispatchError
    (`inspection_unavailable`) when inspection cannot run: the answer is not passed on."""
    replacer = Replacer(detector(), plan.redact_response)
    try:
        out = upstream.redacted_answer(protocol, content, replacer)
    except Exception as exc:  # noqa: BLE001 - fail closed, whatever broke
        raise _inspection_failed(exc) from None
    return out, dict(sorted(replacer.counts.items()))


def _decide(actor: Actor, ctx: CallerContext, route: Route, serving_name: str,
            data_class: str, purpose: str, events: list[Event],
            origin: dict[str, Any] | None,
            findings: dict[str, int] | None = None) -> tuple[Plan | None, DispatchError | None]:
    """Ask the dispatch policy region by region, least busy first; one event per decision.
    `findings`: what inspection found (None: not inspected), in the input and the event."""
    inspected: dict[str, Any] = {} if findings is None else {"findings": [
        {"type": kind, "count": n} for kind, n in sorted(findings.items())]}
    rt = scope.current()
    busy, regional = rt.outstanding.get, rt.policies.regional_violations
    ordered = regions_in_order(route.candidates, busy)
    last: Decision | None = None
    for _region, targets in ordered:
        node = targets[0]
        doc = {
            "now": identifiers.epoch(utcnow()),
            "version": route.version_doc,
            "request": {"purpose": purpose, "data_class": data_class, **inspected},
            "caller": {"team": ctx.team, "teams": list(ctx.teams),
                       "entitlements": ctx.entitlements.as_dict()},
            "node": {"id": node.id, "region": node.region,
                     "attested_version_id": route.version_id},
        }
        decision, event = policy.evaluate(
            "dispatch", doc, actor=actor.ref, target_type="deployment",
            target_id=serving_name,
            context={"serving_name": serving_name, "node": node.name, **(origin or {}),
                     **({"findings": findings, "team": ctx.team}
                        if findings is not None else {})})
        events.append(event)
        if decision.allow:
            return Plan(actor=actor, serving_name=serving_name,
                        deployment_id=route.deployment_id, version_id=route.version_id,
                        model_name=route.model_name, team_id=ctx.team_id,
                        team=ctx.team, data_class=data_class, purpose=purpose,
                        decision=decision, nodes=targets,
                        deprecated_at=route.deprecated_at, task=route.task,
                        sunset=(route.version_doc.get("approval") or {}).get("expires_at")
                        if route.deprecated_at is not None else None), None
        last = decision
        if not only_regional(decision.violation_codes, regional):
            break
    assert last is not None
    if only_regional(last.violation_codes, regional):
        return None, DispatchError(
            "no attested node in a region this request may use: "
            + "; ".join(v.msg for v in last.violations),
            code="no_node_in_allowed_region", status=503,
            details={"violations": last.violation_codes, "decision_id": last.decision_id,
                     "regions_tried": [r for r, _ in ordered]})
    return None, DispatchError(
        "policy denies this request: " + "; ".join(v.msg for v in last.violations),
        code="policy_denied", status=403,
        details={"violations": last.violation_codes, "decision_id": last.decision_id})


def outcome_event(p: Plan, *, node: NodeTarget | None, outcome: str, status: int,
                  tokens_in: int, tokens_out: int, ttft_ms: float | None,
                  request_digest: str, stream: bool, error: str = "",
                  request_id: str | None = None,
                  origin: dict[str, Any] | None = None, estimated_by: str | None = None,
                  response_redacted: dict[str, int] | None = None) -> Event:
    """The `dispatch.outcome` event of an admitted request. `estimated_by`: how Charter
    counted the tokens the node did not report (counted(): tokenizer, events or bytes)."""
    latency_ms = round((utcnow() - p.started).total_seconds() * 1000, 2)
    _observe(p, node, outcome, tokens_in, tokens_out, ttft_ms, latency_ms)
    audit_outcome = {"completed": "success", "aborted": "failure", "failed": "failure",
                     "cancelled": "failure", "interrupted": "failure"}[outcome]
    return Event.of(
        actor=p.actor.ref, action="dispatch.outcome", target_type="deployment",
        target_id=p.serving_name, outcome=audit_outcome,
        details={"outcome": outcome, "status": status, "decision_id": p.decision.decision_id,
                 "node": node.name if node else None,
                 "region": node.region if node else None, "team": p.team,
                 "data_class": p.data_class, "purpose": p.purpose,
                 "tokens_in": tokens_in, "tokens_out": tokens_out, "ttft_ms": ttft_ms,
                 "latency_ms": latency_ms, "request_digest": request_digest,
                 "stream": stream, "error": error[:300],
                 "tokens_estimated": estimated_by is not None,
                 **({"estimated_by": estimated_by} if estimated_by else {}),
                 **({"redacted": p.redacted} if p.redacted else {}),
                 **({"capture_id": p.capture.id} if p.capture is not None else {}),
                 **({"response_redacted": response_redacted} if response_redacted else {}),
                 **({"key_id": p.actor.key_id} if p.actor.key_id else {}),
                 **(origin or {})},
        request_id=request_id,
    )


def _observe(p: Plan, node: NodeTarget | None, outcome: str, tokens_in: int,
             tokens_out: int, ttft_ms: float | None, latency_ms: float) -> None:
    """The outcome on /metrics. Labels are bounded by configuration (teams, serving names,
    nodes), never by callers or requests."""
    rt = scope.current()
    where = node.name if node else "none"
    tokens = rt.counter("charter_tokens_total", "Tokens by team, serving name and "
                        "direction (in, out): the node's own counts",
                        ("team", "model", "direction"))
    team = p.team or "none"
    tokens.labels(team, p.serving_name, "in").inc(tokens_in)
    tokens.labels(team, p.serving_name, "out").inc(tokens_out)
    rt.counter("charter_dispatch_outcomes_total", "Admitted requests by serving name, node "
               "and outcome", ("model", "node", "outcome")).labels(
        p.serving_name, where, outcome).inc()
    if ttft_ms is not None:
        rt.histogram("charter_time_to_first_token_seconds", "Time to the first byte from "
                     "the node", ("model", "node")).labels(p.serving_name, where).observe(
            ttft_ms / 1000)
    rt.histogram("charter_request_duration_seconds", "Admission to outcome",
                 ("model", "node")).labels(p.serving_name, where).observe(latency_ms / 1000)


def usage_of(p: Plan, tokens_in: int, tokens_out: int,
             estimated: int = 0) -> tuple[UsageDelta, ...]:
    """The token counters of an outcome (the request was counted when it was admitted);
    `estimated`: how many of the tokens are Charter's count, not the node's."""
    if not tokens_in and not tokens_out:
        return ()
    return (UsageDelta(p.team_id, p.serving_name, utcnow().date(), tokens_in=tokens_in,
                       tokens_out=tokens_out, key_id=p.actor.key_id or "",
                       tokens_estimated=estimated),)


@dataclass(frozen=True, slots=True)
class Counted:
    """An answer's tokens: the node's, and Charter's count of what the node left out."""

    tokens_in: int
    tokens_out: int
    estimated: int = 0  # how many of them Charter counted
    estimated_by: str | None = None  # tokenizer | events | bytes (charter.metering.tokens)


def _tokenizer_pin(version_id: str) -> TokenizerPin | None:
    found = registry.tokenizer_pin(version_id)
    return TokenizerPin(*found) if found else None


def counted_whole(p: Plan, protocol: str, body: dict[str, Any], answer: Any,
                  reported: tuple[int, int] | None = None) -> Counted:
    """The tokens of a whole answer (`answer`: its parsed JSON): the counts it carries
    (`reported`: TGI's count headers, which come first), the rest counted by Charter."""
    return counted(p, protocol, body, *(reported or upstream.usage(protocol, answer)),
                   lambda: answer_of(protocol, answer))


def counted_embedding(p: Plan, protocol: str, body: dict[str, Any], answer: Any,
                      headers: Any) -> Counted:
    """An embedding request's tokens, all of them input: what the node reported (OpenAI's
    `usage.prompt_tokens`, TEI's `x-compute-tokens` header), else Charter's count of each
    input with the version's tokenizer (or roughly), said so."""
    reported = upstream.embedding_usage(protocol, answer, headers)
    if reported is not None:
        return Counted(reported, 0)
    rt = scope.current()
    counter = rt.part("tokenizers", lambda rt: Tokenizers(rt.settings.tokenizers_dir,
                                                          _tokenizer_pin))
    tokens, method = 0, "bytes"
    for item in inputs_of(protocol, body):
        ours = counter.count(p.version_id, item, "")
        tokens, method = tokens + ours.tokens_in, ours.method
    rt.counter("charter_tokens_estimated_total", "Tokens a node did not report, counted by "
               "Charter, by how (tokenizer, events, bytes)", ("estimator",)).labels(
        method).inc(tokens)
    return Counted(tokens, 0, tokens, method)


def counted(p: Plan, protocol: str, body: dict[str, Any], tokens_in: int | None,
            tokens_out: int | None, answer: Callable[[], str], *,
            events: int | None = None) -> Counted:
    """The node's counts where it reported them; the rest counted by Charter with the
    version's tokenizer (or roughly), said so. `answer`: the generated text, asked for only
    when needed; `events`: a TGI stream's token events."""
    if tokens_in is not None and tokens_out is not None:
        return Counted(tokens_in, tokens_out)
    rt = scope.current()
    counter = rt.part("tokenizers", lambda rt: Tokenizers(rt.settings.tokenizers_dir,
                                                          _tokenizer_pin))
    ours = counter.count(p.version_id, prompt_of(protocol, body),
                         answer() if tokens_out is None and events is None else "",
                         events=events)
    estimated = (ours.tokens_in if tokens_in is None else 0) + (
        ours.tokens_out if tokens_out is None else 0)
    rt.counter("charter_tokens_estimated_total", "Tokens a node did not report, counted by "
               "Charter, by how (tokenizer, events, bytes)", ("estimator",)).labels(
        ours.method).inc(estimated)
    return Counted(ours.tokens_in if tokens_in is None else tokens_in,
                   ours.tokens_out if tokens_out is None else tokens_out,
                   estimated, ours.method)


def record_outcome(p: Plan, *, node: NodeTarget | None, outcome: str, status: int,
                   tokens_in: int, tokens_out: int, ttft_ms: float | None,
                   request_digest: str, stream: bool, error: str = "",
                   request_id: str | None = None, estimated: int = 0,
                   estimated_by: str | None = None, final: bool = True,
                   response_redacted: dict[str, int] | None = None) -> None:
    """Queue the outcome event and the token counters (the request was counted when it
    was admitted); written with the next commit, within `audit_outcome_linger_s`. A
    `final` outcome (not a failed try before a failover) settles the request's limits.
    `response_redacted`: the findings replaced in the answer, by type (counts only)."""
    event = outcome_event(p, node=node, outcome=outcome, status=status, tokens_in=tokens_in,
                          tokens_out=tokens_out, ttft_ms=ttft_ms,
                          request_digest=request_digest, stream=stream, error=error,
                          request_id=request_id, estimated_by=estimated_by,
                          response_redacted=response_redacted)
    scope.current().writer.defer(Entry(events=(event,), usage=usage_of(
        p, tokens_in, tokens_out, estimated)))
    if final:
        settle(p.ticket, tokens_in + tokens_out)
