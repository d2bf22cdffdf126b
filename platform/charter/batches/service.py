"""OpenAI-style batches: accept, start, report, cancel, sweep.

The lines run in lanes (charter.batches.lanes); a batch ends in charter.batches.results.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from charter import scope
from charter.actor import SYSTEM, Actor
from charter.batches import jsonl, slots
from charter.batches.files import (
    READERS,
    BatchRequestError,
    new_id,
    require_owner,
    ts,
    visible_file,
)
from charter.batches.lanes import lane_name, send_lanes
from charter.batches.models import (
    ACTIVE_BATCH_STATES,
    OPEN_LINE_STATES,
    Batch,
    BatchLine,
    StoredFile,
)
from charter.batches.results import end_pending, finalize
from charter.db import utcnow
from charter.errors import (
    CharterError,
    ConflictError,
    NotFoundError,
)
from charter.settings import Settings
from charter.uow import record, refuse, unit_of_work

log = structlog.get_logger("charter.batches")

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}


# --- batches --------------------------------------------------------------------------------

def create_batch(actor: Actor, *, input_file_id: Any, endpoint: Any, completion_window: Any,
                 metadata: Any = None, data_class: str | None = None,
                 purpose: str | None = None) -> Batch:
    """Accept a batch over an uploaded file; it starts on a worker (`start_batch`)."""
    try:
        if endpoint not in jsonl.ENDPOINTS:
            raise BatchRequestError(f"`endpoint` must be one of {', '.join(jsonl.ENDPOINTS)}",
                                    code="invalid_endpoint")
        if completion_window not in COMPLETION_WINDOWS:
            raise BatchRequestError("`completion_window` must be 24h",
                                    code="invalid_completion_window")
        _check_metadata(metadata)
        if not isinstance(input_file_id, str) or not input_file_id:
            raise BatchRequestError("`input_file_id` is required", code="invalid_input_file")
    except CharterError as exc:
        refuse(exc.audited(actor.ref, "batch.create", "batch", "-"))
    now = utcnow()
    with unit_of_work() as session:
        try:
            stored = visible_file(session, actor, input_file_id)
            if stored.purpose != "batch":
                raise BatchRequestError("the input file must have purpose batch",
                                        code="invalid_input_file")
        except CharterError as exc:
            refuse(exc.audited(actor.ref, "batch.create", "batch", input_file_id[:200]))
        batch = Batch(id=new_id("batch_"), owner_user_id=actor.user_id, actor_ref=actor.ref,
                      endpoint=endpoint, input_file_id=stored.id,
                      completion_window=completion_window, status="validating",
                      data_class=data_class, purpose=purpose, meta=metadata, errors=[],
                      created_at=now, expires_at=now + COMPLETION_WINDOWS[completion_window])
        session.add(batch)
        session.flush()
        record(session, actor=actor.ref, action="batch.created", target_type="batch",
                     target_id=batch.id,
                     details={"input_file_id": stored.id, "sha256": stored.sha256,
                              "endpoint": endpoint, "lines": stored.lines,
                              "invalid_lines": stored.invalid_lines, "data_class": data_class,
                              "purpose": purpose})
    scope.current().tasks.send("charter.batches.start", batch.id)
    return batch


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > 16 or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in metadata.items()):
        raise BatchRequestError("`metadata` holds at most 16 string pairs (keys up to 64, "
                                "values up to 512 characters)", code="invalid_metadata")


def _visible_batch(session: Session, actor: Actor, batch_id: str, *,
                   for_update: bool = False) -> Batch:
    batch = session.get(Batch, batch_id, with_for_update=for_update)
    if batch is None or (batch.owner_user_id != actor.user_id and not actor.has(*READERS)):
        raise NotFoundError(f"no batch {batch_id}", code="batch_not_found")
    return batch


def get_batch(actor: Actor, batch_id: str) -> dict[str, Any]:
    with unit_of_work() as session:
        batch = _visible_batch(session, actor, batch_id)
        return batch_view(batch, _counts(session, [batch.id]).get(batch.id, {}))


def list_batches(actor: Actor, *, limit: int = 20, after: str | None = None
                 ) -> tuple[list[dict[str, Any]], bool]:
    with unit_of_work() as session:
        stmt = select(Batch)
        if not actor.has(*READERS):
            stmt = stmt.where(Batch.owner_user_id == actor.user_id)
        if after:
            cursor = session.get(Batch, after)
            if cursor is not None:
                stmt = stmt.where((Batch.created_at < cursor.created_at) | (
                    (Batch.created_at == cursor.created_at) & (Batch.id < after)))
        rows = list(session.scalars(stmt.order_by(Batch.created_at.desc(), Batch.id.desc())
                                    .limit(limit + 1)))
        page = rows[:limit]
        counts = _counts(session, [b.id for b in page])
        return [batch_view(b, counts.get(b.id, {})) for b in page], len(rows) > limit


def _counts(session: Session, batch_ids: list[str]) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {}
    if not batch_ids:
        return found
    for batch_id, status, n in session.execute(
            select(BatchLine.batch_id, BatchLine.status, func.count())
            .where(BatchLine.batch_id.in_(batch_ids))
            .group_by(BatchLine.batch_id, BatchLine.status)):
        found.setdefault(batch_id, {})[status] = int(n)
    return found


def batch_view(batch: Batch, counts: dict[str, int]) -> dict[str, Any]:
    """The batch in OpenAI's shape; `request_counts` are read from the lines themselves."""
    total = sum(counts.values())
    completed = counts.get("succeeded", 0)
    open_lines = sum(counts.get(s, 0) for s in OPEN_LINE_STATES)
    errors = None
    if batch.errors:
        errors = {"object": "list", "data": [
            {"code": e.get("code"), "message": e.get("message"), "param": e.get("param"),
             "line": e.get("line")} for e in batch.errors]}
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "errors": errors,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": batch.status, "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id, "created_at": ts(batch.created_at),
        "in_progress_at": ts(batch.in_progress_at), "expires_at": ts(batch.expires_at),
        "finalizing_at": ts(batch.finalizing_at), "completed_at": ts(batch.completed_at),
        "failed_at": ts(batch.failed_at), "expired_at": ts(batch.expired_at),
        "cancelling_at": ts(batch.cancelling_at), "cancelled_at": ts(batch.cancelled_at),
        "request_counts": {"total": total, "completed": completed,
                           "failed": total - completed - open_lines},
        "metadata": batch.meta,
        "charter": {"data_class": batch.data_class, "purpose": batch.purpose,
                    "pending": counts.get("pending", 0), "running": counts.get("running", 0)},
    }


def cancel_batch(actor: Actor, batch_id: str) -> dict[str, Any]:
    """Stop a batch: no line starts after this; lines on a node finish and are kept."""
    now = utcnow()
    with unit_of_work() as session:
        batch = _visible_batch(session, actor, batch_id, for_update=True)
        require_owner(actor, batch.owner_user_id, "batch.cancel", "batch", batch_id)
        if batch.status not in ("validating", "in_progress"):
            refuse(ConflictError(f"a batch that is {batch.status} cannot be cancelled",
                                 code="batch_not_cancellable",
                                 details={"status": batch.status}).audited(
                actor.ref, "batch.cancel", "batch", batch_id))
        batch.status, batch.cancelling_at = "cancelling", now
        ended = end_pending(session, batch.id, "cancelled", "batch_cancelled",
                             "the batch was cancelled before this line ran")
        record(session, actor=actor.ref, action="batch.cancel", target_type="batch",
                     target_id=batch.id, details={"lines_cancelled": ended})
    finalize(batch_id)
    return get_batch(actor, batch_id)


def start_batch(batch_id: str) -> None:
    """validating -> in_progress: the input file's lines become rows; the first window of
    them is queued. Idempotent: a batch that has started is left alone."""
    settings = scope.current().settings
    now = utcnow()
    with unit_of_work() as session:
        batch = session.get(Batch, batch_id, with_for_update=True)
        if batch is None or batch.status != "validating":
            return
        content = session.scalar(select(StoredFile.content)
                                 .where(StoredFile.id == batch.input_file_id))
        try:
            if content is None:
                raise BatchRequestError("the input file's content is gone",
                                        code="input_file_missing")
            lines = jsonl.parse(content, max_lines=settings.batch_max_lines,
                                max_tokens=settings.dispatch_max_new_tokens)
        except CharterError as exc:
            lines = []
            batch.errors = [{"code": exc.code, "message": exc.message}]
        rows = [_line_row(batch, line, now) for line in lines]
        if rows:
            session.execute(insert(BatchLine), rows)
        valid = sum(1 for r in rows if r["status"] == "pending")
        if valid == 0 and not batch.errors:
            batch.errors = [{"code": "no_valid_lines",
                             "message": "no line of the input file is a valid request"}]
        batch.status, batch.in_progress_at = "in_progress", now
        record(session, actor=SYSTEM.ref, action="batch.started", target_type="batch",
                     target_id=batch.id,
                     details={"owner": batch.actor_ref, "lines": len(rows), "valid": valid,
                              "invalid": len(rows) - valid})
    if valid:
        send_lanes(batch_id, settings)
    else:
        finalize(batch_id)


def _line_row(batch: Batch, line: jsonl.Line, now: datetime) -> dict[str, Any]:
    row: dict[str, Any] = {"batch_id": batch.id, "line_no": line.line_no,
                           "custom_id": line.custom_id, "request": line.body, "attempts": 0,
                           "status": "pending", "error_code": None, "error_message": None,
                           "finished_at": None}
    code, message = line.error_code, line.error_message
    if line.valid and line.url != batch.endpoint:
        code, message = "url_mismatch", f"`url` must be the batch's endpoint {batch.endpoint}"
    if code is not None:
        row.update(status="invalid", request=None, error_code=code, error_message=message,
                   finished_at=now)
    return row


# --- sweeping, finalizing ------------------------------------------------------------------

def sweep(settings: Settings, now: datetime | None = None) -> dict[str, int]:
    """Periodic: start batches whose start was lost, send again lanes whose worker or
    message was lost, honour expiry, end lines whose worker vanished in a batch that no
    longer runs, finalize what is done."""
    now = now or utcnow()
    stats = {"started": 0, "lanes": 0, "expired": 0, "finalized": 0}
    with unit_of_work() as session:
        active = [(b.id, b.status, b.created_at, b.expires_at) for b in session.scalars(
            select(Batch).where(Batch.status.in_(ACTIVE_BATCH_STATES)))]
    for batch_id, status, created_at, expires_at in active:
        if status == "validating":
            if now - created_at > timedelta(seconds=5):
                stats["started"] += scope.current().tasks.send("charter.batches.start", batch_id)
            continue
        if status == "in_progress" and now >= expires_at:
            status = "expired"
        if status == "in_progress":
            if _claimable(batch_id, now):
                stats["lanes"] += send_lanes(batch_id, settings, [
                    k for k in range(settings.batch_lanes)
                    if slots.lock_is_free(lane_name(batch_id, k))])
        else:
            ending = {"expired": ("expired", "batch_expired", "the batch's completion "
                                  "window ended before this line ran"),
                      "cancelling": ("cancelled", "batch_cancelled",
                                     "the batch was cancelled before this line ran"),
                      "finalizing": ("failed", "batch_stopped", "the batch stopped before "
                                     "this line ran")}[status]
            with unit_of_work() as session:
                ended = end_pending(session, batch_id, *ending)
                ended += _end_abandoned(session, batch_id, now, *ending)
            if status == "expired":
                stats["expired"] += ended
        if finalize(batch_id):
            stats["finalized"] += 1
    return stats


def _claimable(batch_id: str, now: datetime) -> bool:
    with unit_of_work() as session:
        return session.scalar(select(BatchLine.id).where(
            BatchLine.batch_id == batch_id,
            ((BatchLine.status == "pending")
             & (BatchLine.not_before.is_(None) | (BatchLine.not_before <= now)))
            | ((BatchLine.status == "running") & (BatchLine.lease_until < now))
        ).limit(1)) is not None


def _end_abandoned(session: Session, batch_id: str, now: datetime, status: str, code: str,
                   message: str) -> int:
    """Lines left running by a vanished worker in a batch that takes no new lines."""
    result = session.execute(
        update(BatchLine).where(BatchLine.batch_id == batch_id,
                                BatchLine.status == "running", BatchLine.lease_until < now)
        .values(status=status, error_code=code, finished_at=now, claim=None,
                lease_until=None, error_message=f"{message} (its worker vanished)"))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
