"""Running a batch's lines: lanes, claims, the governed dispatch of each line.

A batch's lines are rows (charter.batches.models), run by its lanes (`run_lane`, one task
each, `batch_lanes` of them): a lane takes lines one after another, and for each

1. **claim** (one statement): the next pending line -> running, with a fresh claim token
   and a lease. A line still `running` after its lease passed lost its worker: the attempt
   is recorded as interrupted (audited) and the line is taken again.
2. **admit** through `charter.dispatch.service.admit`, as the batch's owner, with the
   batch's data class and purpose: the decision event is committed before anything is sent.
3. **dispatch** holding a batch slot on the node (charter.batches.slots).
4. **finish**: the outcome event (with the token counters), then the answer, written only
   if the claim token is still the line's. A worker that lost its line (it ran past its
   lease and another took over) leaves the answer to the attempt that holds it.

Nothing depends on the broker delivering exactly once: a duplicate lane finds its lock
held, a lost one is sent again by the sweep, and a line is taken by one claim at a time.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
import structlog
from sqlalchemy import bindparam, exists, select, update
from sqlalchemy import exc as sa_exc

from charter import scope
from charter.actor import SYSTEM, Actor
from charter.audit.journal import Event
from charter.audit.writer import Entry
from charter.batches import jsonl, slots
from charter.batches.models import (
    Batch,
    BatchLine,
)
from charter.batches.results import end_pending, finalize
from charter.context import RequestContext
from charter.db import ChangeGeneration, table_of, utcnow
from charter.dispatch import upstream
from charter.dispatch.service import (
    Asked,
    Counted,
    Plan,
    admit,
    counted_embedding,
    counted_whole,
    keep,
    outcome_event,
    redacted_answer,
    usage_of,
)
from charter.errors import (
    CharterError,
    DatabaseUnavailableError,
)
from charter.identity import service as identity
from charter.metering.service import UsageDelta
from charter.nodes import service as nodes
from charter.nodes.client import NodeCallError
from charter.nodes.service import NodeTarget
from charter.readcache import StaleReadError
from charter.settings import Settings
from charter.uow import record, unit_of_work

log = structlog.get_logger("charter.batches")

STOPPING_VIOLATIONS = frozenset({"version_revoked", "version_not_approved", "approval_missing",
                                 "approval_expired", "approval_invalid"})
STOPPING_CODES = frozenset({"model_not_found"})
# Refusals that pass: the line waits (not counted as an attempt) and is tried again.
WAITING_CODES = frozenset({"no_attested_node", "no_node_in_allowed_region", "registry_busy",
                           "audit_unavailable", "database_unavailable", "policy_unavailable",
                           "policy_not_configured"})
_STALE_RETRIES = 5


# --- running lines --------------------------------------------------------------------------

@dataclass
class _Claim:
    line_id: int
    batch_id: str
    line_no: int
    custom_id: str
    body: dict[str, Any]
    attempt: int
    token: str
    generation: int
    owner_user_id: str
    endpoint: str
    data_class: str | None
    purpose: str | None


@dataclass(frozen=True)
class _BatchInfo:
    id: str
    owner_user_id: str
    actor_ref: str
    endpoint: str
    data_class: str | None
    purpose: str | None


def lane_name(batch_id: str, lane: int) -> str:
    return f"lane:{batch_id}:{lane}"


def send_lanes(batch_id: str, settings: Settings, lanes: range | list[int] | None = None
               ) -> int:
    sent = 0
    for lane in (range(settings.batch_lanes) if lanes is None else lanes):
        sent += scope.current().tasks.send("charter.batches.lane", batch_id, lane)
    return sent


def run_lane(batch_id: str, lane: int, settings: Settings) -> str:
    """One of a batch's `batch_lanes` lanes (a task body): take and run its lines one after
    another until none can be taken now, for at most `batch_lane_s` (then the lane queues
    itself again, so no task outlives the broker's redelivery timeout).

    A lane is a named lock (charter.batches.slots): a duplicate task finds it held and ends;
    the lock of a lane whose worker died is free again, and the sweep sends that lane anew.
    """
    again = False
    ran = 0
    with slots.named_lock(lane_name(batch_id, lane)) as held:
        if not held:
            return "duplicate"
        info = _batch_info(batch_id)
        if info is None:
            return "gone"
        deadline = time.monotonic() + settings.batch_lane_s
        carry_token = _carry_var.set([])
        try:
            while True:
                if time.monotonic() >= deadline:
                    again = True
                    break
                if run_next(info, settings, lane) == "empty":
                    break
                ran += 1
            _settle()
        finally:
            _carry_var.reset(carry_token)
    if again:
        scope.current().tasks.send("charter.batches.lane", batch_id, lane)
    else:
        finalize(batch_id)  # nothing happens while lines are still open
    return f"ran {ran}"


def _batch_info(batch_id: str) -> _BatchInfo | None:
    with unit_of_work() as session:
        b = session.get(Batch, batch_id)
        if b is None:
            return None
        return _BatchInfo(b.id, b.owner_user_id, b.actor_ref, b.endpoint, b.data_class,
                          b.purpose)


def run_next(info: _BatchInfo, settings: Settings, lane: int = 0) -> str:
    """Take the batch's next line that may run now and run it; "empty" if there is none
    (or the batch no longer runs). Returns what happened, for logs and tests."""
    request_id = uuid.uuid4().hex
    with scope.bound(scope.current(), request_id=request_id):
        claim = _claim_next(info, settings)
        if isinstance(claim, str):
            return claim
        return _run_claimed(claim, settings, request_id, lane)


def _claim_next(info: _BatchInfo, settings: Settings) -> _Claim | str:
    """One statement: the first pending line (or one whose worker vanished: its lease ran
    out) becomes this attempt's, with a new claim token; the change generation is read in
    the same statement. Concurrent lanes skip each other's rows (SKIP LOCKED)."""
    now = utcnow()
    token = secrets.token_hex(16)
    row = _run("claim", {
        "batch": info.id, "now": now, "token": token,
        "lease": now + timedelta(seconds=settings.batch_line_lease_s)}).first()
    if row is None:
        return "empty"
    line_id, line_no, custom_id, body, attempts, last_error, was, gen = row
    c = _Claim(line_id, info.id, line_no, custom_id, body, attempts, token, int(gen),
               info.owner_user_id, info.endpoint, info.data_class, info.purpose)
    if was == "running":  # its worker vanished mid-attempt (killed, or cut off)
        scope.current().writer.commit(Entry(events=(Event.of(
            actor=info.actor_ref, action="batch.line_interrupted", target_type="batch",
            target_id=info.id, details={"line": line_no, "custom_id": custom_id,
                                        "attempt": attempts - 1}),)))
    if attempts > settings.batch_line_max_attempts:
        last = f": {last_error}" if last_error else ""
        _finish(c, status="failed", response_status=None, response_body=None,
                error_code="attempts_exhausted",
                error_message=f"no answer after {attempts - 1} attempts{last}")
        return "exhausted"
    return c


def _owner(user_id: str, generation: int) -> Actor | None:
    return scope.current().readcache.cached(generation, ("batch_owner", user_id),
                                            lambda: identity.active_actor(user_id))


def _capacities(targets: list[NodeTarget], generation: int) -> dict[str, int]:
    ids = tuple(sorted(n.id for n in targets))
    return scope.current().readcache.cached(generation, ("node_capacity", ids),
                                            lambda: nodes.capacities(ids))


def _run_claimed(c: _Claim, settings: Settings, request_id: str, lane: int = 0) -> str:
    origin = {"batch_id": c.batch_id, "custom_id": c.custom_id, "line": c.line_no,
              "attempt": c.attempt}
    generation = c.generation
    actor = _owner(c.owner_user_id, generation)
    if actor is None:
        return _stop(c, "owner_inactive", "the batch's owner is no longer active", 403)
    plan: Plan | None = None
    try:
        for _ in range(_STALE_RETRIES):
            try:
                rc = RequestContext(request_id, generation=generation, actor=actor)
                plan = admit(rc, serving_name=c.body["model"], data_class=c.data_class,
                             purpose=c.purpose, protocol="openai", origin=origin,
                             task=jsonl.TASKS.get(c.endpoint, "generation"),
                             content=Asked("openai", c.body,
                                           jsonl.TASKS.get(c.endpoint, "generation")))
                break
            except StaleReadError as exc:
                generation = exc.generation
                actor = _owner(c.owner_user_id, generation)
                if actor is None:
                    return _stop(c, "owner_inactive", "the batch's owner is no longer active",
                                 403)
    except CharterError as exc:
        _settle()  # admit's commit carried the lane's previous outcome
        return _refused(c, exc, settings)
    _settle()
    if plan is None:
        return _put_back(c, wait_s=1.0, refund=True, error="the registry kept changing")
    return _dispatch(c, plan, settings, request_id, origin, generation, lane)


def _refused(c: _Claim, exc: CharterError, settings: Settings) -> str:
    violations = set(exc.details.get("violations") or ())
    if exc.code in STOPPING_CODES or (exc.code == "policy_denied"
                                      and violations & STOPPING_VIOLATIONS):
        code = sorted(violations & STOPPING_VIOLATIONS)[0] if violations else exc.code
        return _stop(c, code, exc.message, exc.status, exc)
    if exc.code == "quota_exceeded":
        return _put_back(c, wait_s=float(exc.details.get("retry_after_s", 60)), refund=True,
                         error=exc.message, result="quota")
    if exc.code in WAITING_CODES or exc.status >= 500:
        return _put_back(c, wait_s=min(30.0, 2.0 ** c.attempt), refund=True,
                         error=exc.message, result="waiting")
    # Refused for this line only (a data class, a purpose, a team's entitlement): reported.
    _finish(c, status="failed", response_status=exc.status,
            response_body=json.dumps(_openai_error(exc)), error_code=exc.code,
            error_message=exc.message)
    return "refused"


def _openai_error(exc: CharterError) -> dict[str, Any]:
    return upstream.error_body("openai", exc.message, code=exc.code,
                               kind="invalid_request_error" if exc.status < 500 else "api_error")


def _dispatch(c: _Claim, plan: Plan, settings: Settings, request_id: str,
              origin: dict[str, Any], generation: int, lane: int = 0) -> str:
    rt = scope.current()
    pool, url_policy = rt.node_pool, rt.node_urls
    digest = "sha256:" + hashlib.sha256(json.dumps(c.body).encode()).hexdigest()
    sent = c.body if plan.body is None else plan.body  # with its findings replaced
    raw = json.dumps(sent).encode()
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    remaining = list(plan.nodes)
    capacities = _capacities(remaining, generation)
    last_error = "no node answered"
    started = time.perf_counter()
    while remaining:
        with slots.node_slot(remaining, capacities, settings.batch_node_share,
                             settings.batch_slot_wait_s, prefer=lane) as node:
            if node is None:
                last_error = "no batch slot freed up on the model's nodes"
                break
            payload = upstream.payload_for(node, "openai", sent, raw)
            try:
                resp = upstream.send(pool, url_policy, node, c.endpoint, payload, headers)
            except (NodeCallError, CharterError, upstream.NodeRefused) as exc:
                remaining.remove(node)
                last_error = str(exc) if isinstance(exc, upstream.NodeRefused) else (
                    f"{node.name}: {type(exc).__name__}")
                log.warning("node unreachable, trying the next", node=node.name, error=str(exc))
                upstream.count_failure(node, exc)
                if isinstance(exc, NodeCallError):  # out of every worker's routes at once
                    upstream.suspect(node, f"{last_error}: {exc}")
                continue
            try:
                content = resp.read()
            except NodeCallError as exc:
                event = outcome_event(plan, node=node, outcome="aborted", status=502,
                                      tokens_in=0, tokens_out=0, ttft_ms=None,
                                      request_digest=digest, stream=False, error=str(exc),
                                      request_id=request_id, origin=origin)
                return _retry_or_fail(c, settings, f"{node.name}: {exc}", event)
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = None
        ok = resp.status == 200
        tokens = Counted(0, 0)  # a refusal by the node generated nothing
        if ok and plan.task == "embedding":
            tokens = counted_embedding(plan, "openai", sent, parsed, resp.headers)
        elif ok:
            tokens = counted_whole(plan, "openai", sent, parsed)
        ttft_ms = round((time.perf_counter() - started) * 1000, 2)
        answer_redacted: dict[str, int] = {}
        if ok and plan.redact_response and plan.task == "generation":
            try:
                content, answer_redacted = redacted_answer(plan, "openai", content)
            except CharterError as exc:  # inspection cannot run: the answer is not kept
                event = outcome_event(plan, node=node, outcome="failed", status=exc.status,
                                      tokens_in=tokens.tokens_in,
                                      tokens_out=tokens.tokens_out, ttft_ms=ttft_ms,
                                      request_digest=digest, stream=False, error=exc.message,
                                      request_id=request_id, origin=origin,
                                      estimated_by=tokens.estimated_by)
                return _retry_or_fail(c, settings, exc.message, event)
        if ok:  # the serving name the line asked for, not what the node calls its model
            content = upstream.named_as_asked(content, plan.serving_name)
            content = _told(content, plan.redacted, answer_redacted)
        text_body = content.decode("utf-8", "replace")
        event = outcome_event(plan, node=node, outcome="completed" if ok else "failed",
                              status=resp.status, tokens_in=tokens.tokens_in,
                              tokens_out=tokens.tokens_out, ttft_ms=ttft_ms,
                              request_digest=digest, stream=False,
                              error="" if ok else text_body[:300], request_id=request_id,
                              origin=origin, estimated_by=tokens.estimated_by,
                              response_redacted=answer_redacted)
        if ok:
            keep(plan, protocol="openai", body=c.body, parsed=parsed, request_id=request_id,
                 response_redacted=answer_redacted)
        written = _finish(c, status="succeeded" if ok else "failed",
                          response_status=resp.status, response_body=text_body,
                          error_code=None if ok else "node_error",
                          error_message=None if ok else f"the node answered {resp.status}",
                          node=node.name, decision_id=plan.decision.decision_id, event=event,
                          usage=usage_of(plan, tokens.tokens_in, tokens.tokens_out,
                                         tokens.estimated))
        return ("succeeded" if ok else "failed") if written else "lost"
    event = outcome_event(plan, node=None, outcome="failed", status=503, tokens_in=0,
                          tokens_out=0, ttft_ms=None, request_digest=digest, stream=False,
                          error=last_error, request_id=request_id, origin=origin)
    return _retry_or_fail(c, settings, last_error, event)


def _told(content: bytes, redacted: dict[str, int], answer_redacted: dict[str, int]) -> bytes:
    """A line's answer that says what was replaced (by type, counts only): `charter.redacted`
    in the request before it was sent, `charter.response_redacted` in the answer."""
    if not (redacted or answer_redacted):
        return content
    try:
        body = json.loads(content)
    except ValueError:
        return content
    if not isinstance(body, dict):
        return content
    body["charter"] = {**({"redacted": redacted} if redacted else {}),
                       **({"response_redacted": answer_redacted} if answer_redacted else {})}
    return json.dumps(body, separators=(",", ":")).encode()


def _retry_or_fail(c: _Claim, settings: Settings, error: str, event: Event) -> str:
    """An attempt that reached no answer: the line is tried again, up to the limit."""
    if c.attempt < settings.batch_line_max_attempts:
        return _put_back(c, wait_s=min(30.0, 2.0 ** c.attempt), refund=False, error=error,
                         event=event, result="retrying")
    _finish(c, status="failed", response_status=None, response_body=None,
            error_code="nodes_unavailable",
            error_message=f"no answer after {c.attempt} attempts: {error}", event=event)
    return "failed"


def _finish(c: _Claim, *, status: str, response_status: int | None,
            response_body: str | None, error_code: str | None, error_message: str | None,
            node: str | None = None, decision_id: str | None = None,
            event: Event | None = None, usage: tuple[UsageDelta, ...] = ()) -> bool:
    """Record the attempt's outcome, then the line's answer if the line is still ours.

    The outcome goes through the process's group writer, shared with other lines' decisions
    and outcomes (one chain-locked transaction per line would serialise every worker on
    the chain lock), and is committed first: a worker that dies in between leaves an
    outcome of an attempt that did happen, and the line is run again; never an answer
    without its outcome. Inside a lane the outcome rides with the lane's next decision
    (one commit a line instead of two): the answer is stored once that commit is done.
    """
    answer = {"line": c.line_id, "token": c.token, "status": status,
              "response_status": response_status, "response_body": response_body,
              "error_code": error_code, "error_message": error_message, "node": node,
              "decision_id": decision_id}
    if event is not None:
        entry = Entry(events=(event,), usage=usage)
        carry = _carry_var.get()
        if carry is not None:
            scope.current().writer.defer(entry)
            carry.append((entry, c, answer))
            return True
        scope.current().writer.commit(entry)
        if entry.result == "failed":
            assert entry.error is not None
            raise entry.error  # the line stays claimed; its lease runs out, it runs again
    return _store(c, answer)


def _store(c: _Claim, answer: dict[str, Any]) -> bool:
    result = _run("finish", {**answer, "finished_at": utcnow()})
    if result.rowcount != 1:
        log.warning("line taken over while it ran; its answer is dropped",
                    line_id=c.line_id, batch_id=c.batch_id)
        return False
    return True


# A lane's answers whose outcome events wait to ride with its next decision's commit.
_carry_var: contextvars.ContextVar[list[tuple[Entry, _Claim, dict[str, Any]]] | None] = (
    contextvars.ContextVar("charter_batch_carry", default=None))


def _settle() -> None:
    """Store the carried answers whose outcomes are committed (after any writer commit,
    which writes what was queued before it; the rest are written now)."""
    carry = _carry_var.get()
    if not carry:
        return
    writer = scope.current().writer
    while carry:
        entry, c, answer = carry[0]
        if not entry.committed:
            writer.flush()
        if entry.refused:
            assert entry.error is not None
            raise entry.error
        if not entry.committed:  # the database is away: the lease runs out, it runs again
            raise DatabaseUnavailableError("an outcome could not be written; try again later")
        carry.pop(0)
        _store(c, answer)


# What a lane runs for every line. On SQLite: Core statements (the finish built once:
# building SQLAlchemy expressions costs more CPU than running them) on a plain connection.
def _claim_sqlite(params: dict[str, Any]) -> _Rows:
    """The claim on SQLite (the embedded demo: one process, and BEGIN IMMEDIATE holds the
    write lock, so nothing can take the line between the two statements)."""
    lines, batches = table_of(BatchLine).c, table_of(Batch).c
    now = params["now"]
    try:
        with scope.current().database.engine.begin() as conn:
            picked = conn.execute(
                select(lines.id, lines.status)
                .where(lines.batch_id == params["batch"],
                       ((lines.status == "pending")
                        & (lines.not_before.is_(None) | (lines.not_before <= now)))
                       | ((lines.status == "running") & (lines.lease_until < now)),
                       exists().where(batches.id == params["batch"],
                                      batches.status == "in_progress",
                                      batches.expires_at > now))
                .order_by(lines.line_no).limit(1)).first()
            if picked is None:
                return _Rows([], 0)
            conn.execute(update(table_of(BatchLine)).where(lines.id == picked.id).values(
                status="running", claim=params["token"], attempts=lines.attempts + 1,
                lease_until=params["lease"]))
            row = conn.execute(select(lines.id, lines.line_no, lines.custom_id, lines.request,
                                      lines.attempts, lines.error_message)
                               .where(lines.id == picked.id)).one()
            generation = conn.execute(select(table_of(ChangeGeneration).c.value)).scalar_one()
            return _Rows([(*row, picked.status, generation)], 1)
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
        raise DatabaseUnavailableError("the database is unavailable; try again later") from exc


@functools.cache
def _finish_statement() -> Any:
    lines = table_of(BatchLine).c
    return (update(table_of(BatchLine))
            .where(lines.id == bindparam("line"), lines.claim == bindparam("token"),
                   lines.status == "running")
            .values(status=bindparam("status"), response_status=bindparam("response_status"),
                    response_body=bindparam("response_body"),
                    error_code=bindparam("error_code"),
                    error_message=bindparam("error_message"), node=bindparam("node"),
                    decision_id=bindparam("decision_id"),
                    finished_at=bindparam("finished_at"), claim=None, lease_until=None))


# On PostgreSQL the same two statements as plain SQL, each one round trip on the thread's
# own autocommit connection (charter.batches.slots): no pool checkout, ping or BEGIN.
_PG_SQL = {
    "claim": """
WITH pick AS (
  SELECT l.id, l.status AS was FROM batch_lines l
  WHERE l.batch_id = %(batch)s
    AND ((l.status = 'pending' AND (l.not_before IS NULL OR l.not_before <= %(now)s))
         OR (l.status = 'running' AND l.lease_until < %(now)s))
    AND EXISTS (SELECT 1 FROM batches b WHERE b.id = %(batch)s AND b.status = 'in_progress'
                AND b.expires_at > %(now)s)
  ORDER BY l.line_no LIMIT 1 FOR UPDATE OF l SKIP LOCKED)
UPDATE batch_lines SET status = 'running', claim = %(token)s,
  attempts = batch_lines.attempts + 1, lease_until = %(lease)s
FROM pick WHERE batch_lines.id = pick.id
RETURNING batch_lines.id, batch_lines.line_no, batch_lines.custom_id, batch_lines.request,
  batch_lines.attempts, batch_lines.error_message, pick.was,
  (SELECT value FROM change_generation WHERE id = 1)""",
    "finish": """
UPDATE batch_lines SET status = %(status)s, response_status = %(response_status)s,
  response_body = %(response_body)s, error_code = %(error_code)s,
  error_message = %(error_message)s, node = %(node)s, decision_id = %(decision_id)s,
  finished_at = %(finished_at)s, claim = NULL, lease_until = NULL
WHERE id = %(line)s AND claim = %(token)s AND status = 'running'""",
}


def _run(name: str, params: dict[str, Any]) -> _Rows:
    conn = slots.pg_connection()
    if conn is None:
        if name == "claim":
            return _claim_sqlite(params)
        return _core(_finish_statement(), params)
    try:
        cur = conn.execute(_PG_SQL[name], params)
        return _Rows(cur.fetchall() if cur.description else [], cur.rowcount)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailableError("the database is unavailable; try again later") from exc


def _core(stmt: Any, params: dict[str, Any]) -> _Rows:
    """Run one Core statement in its own transaction (the result stays readable)."""
    try:
        with scope.current().database.engine.begin() as conn:
            result = conn.execute(stmt, params)
            if result.returns_rows:
                return _Rows(list(result.all()), result.rowcount)
            return _Rows([], result.rowcount)
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
        raise DatabaseUnavailableError("the database is unavailable; try again later") from exc


@dataclass
class _Rows:
    rows: list[Any]
    rowcount: int

    def first(self) -> Any:
        return self.rows[0] if self.rows else None


def _put_back(c: _Claim, *, wait_s: float, refund: bool, error: str,
              event: Event | None = None, result: str = "busy") -> str:
    """The line goes back to pending, to be taken again after `wait_s`."""
    if event is not None:
        scope.current().writer.commit(Entry(events=(event,)))
    with unit_of_work() as session:
        done = session.execute(
            update(BatchLine).where(BatchLine.id == c.line_id, BatchLine.claim == c.token,
                                    BatchLine.status == "running")
            .values(status="pending", claim=None, lease_until=None,
                    not_before=utcnow() + timedelta(seconds=wait_s), error_message=error[:500],
                    attempts=BatchLine.attempts - (1 if refund else 0)))
        if done.rowcount != 1:  # type: ignore[attr-defined]
            log.warning("line taken over while it waited", line_id=c.line_id)
    return result


def _stop(c: _Claim, code: str, message: str, status: int,
          exc: CharterError | None = None) -> str:
    """End the whole batch: its model may no longer be used (or its owner is gone)."""
    body = json.dumps(_openai_error(exc or CharterError(message, code=code, status=status)))
    _finish(c, status="failed", response_status=status, response_body=body, error_code=code,
            error_message=message)
    with unit_of_work() as session:
        batch = session.get(Batch, c.batch_id, with_for_update=True)
        assert batch is not None
        if batch.status == "in_progress":
            batch.status, batch.finalizing_at = "finalizing", utcnow()
            batch.errors = [{"code": code, "message": message, "line": c.line_no}]
            ended = end_pending(session, batch.id, "failed", code,
                                 f"the batch stopped: {message}")
            record(session, actor=SYSTEM.ref, action="batch.stopped", target_type="batch",
                         target_id=batch.id,
                         details={"code": code, "message": message, "line": c.line_no,
                                  "custom_id": c.custom_id, "lines_ended": ended})
    return "stopped"
