"""Ending a batch: its output and error files, and its final status."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from charter.actor import SYSTEM
from charter.batches.files import new_id
from charter.batches.models import (
    OPEN_LINE_STATES,
    Batch,
    BatchLine,
    StoredFile,
)
from charter.db import utcnow
from charter.uow import record, unit_of_work

log = structlog.get_logger("charter.batches")


def end_pending(session: Session, batch_id: str, status: str, code: str, message: str) -> int:
    result = session.execute(
        update(BatchLine).where(BatchLine.batch_id == batch_id, BatchLine.status == "pending")
        .values(status=status, error_code=code, error_message=message, finished_at=utcnow(),
                claim=None, lease_until=None))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]



def finalize(batch_id: str) -> bool:
    """Once no line is open: write the output and error files and end the batch
    (completed, failed, expired or cancelled). True if this call ended it."""
    now = utcnow()
    with unit_of_work() as session:
        batch = session.get(Batch, batch_id, with_for_update=True)
        if batch is None or batch.status not in ("in_progress", "cancelling", "finalizing"):
            return False
        open_lines = session.scalar(select(func.count()).where(
            BatchLine.batch_id == batch_id, BatchLine.status.in_(OPEN_LINE_STATES)))
        if open_lines:
            return False
        lines = list(session.scalars(select(BatchLine).where(BatchLine.batch_id == batch_id)
                                     .order_by(BatchLine.line_no)))
        out = [_output_line(batch, line) for line in lines if line.status == "succeeded"]
        err = [_output_line(batch, line) for line in lines if line.status != "succeeded"]
        batch.finalizing_at = now
        if out:
            batch.output_file_id = _result_file(session, batch, "batch_output", out).id
        if err:
            batch.error_file_id = _result_file(session, batch, "batch_error", err).id
        if batch.status == "cancelling":
            batch.status, batch.cancelled_at = "cancelled", now
        elif any(line.status == "expired" for line in lines):
            batch.status, batch.expired_at = "expired", now
        elif batch.errors:
            batch.status, batch.failed_at = "failed", now
        else:
            batch.status, batch.completed_at = "completed", now
        record(session, actor=SYSTEM.ref, action=f"batch.{batch.status}", target_type="batch",
                     target_id=batch.id,
                     details={"owner": batch.actor_ref, "lines": len(lines),
                              "succeeded": len(out), "not_succeeded": len(err),
                              "output_file_id": batch.output_file_id,
                              "error_file_id": batch.error_file_id,
                              "errors": batch.errors})
    return True


def _output_line(batch: Batch, line: BatchLine) -> bytes:
    response = None
    if line.response_status is not None:
        try:
            body: Any = json.loads(line.response_body or "null")
        except ValueError:
            body = line.response_body
        response = {"status_code": line.response_status,
                    "request_id": f"batch_req_{line.id:012d}", "body": body}
    error = None
    if line.status != "succeeded":
        error = {"code": line.error_code or line.status, "message": line.error_message or "",
                 "line": line.line_no}
    return json.dumps({"id": f"batch_req_{line.id:012d}", "custom_id": line.custom_id,
                       "response": response, "error": error}, separators=(",", ":")).encode()


def _result_file(session: Session, batch: Batch, purpose: str, rows: list[bytes]
                 ) -> StoredFile:
    content = b"\n".join(rows) + b"\n"
    stored = StoredFile(id=new_id("file-"), owner_user_id=batch.owner_user_id,
                        purpose=purpose, filename=f"{batch.id}_{purpose.split('_')[1]}.jsonl",
                        bytes=len(content), sha256=hashlib.sha256(content).hexdigest(),
                        lines=len(rows), invalid_lines=0, content=content, created_at=utcnow())
    session.add(stored)
    session.flush()
    return stored
