"""Uploaded files: batch inputs, and the output and error files batches write."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from charter.actor import SYSTEM, Actor
from charter.batches import jsonl
from charter.batches.models import (
    ACTIVE_BATCH_STATES,
    Batch,
    StoredFile,
)
from charter.db import utcnow
from charter.errors import (
    CharterError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
)
from charter.settings import Settings
from charter.uow import record, refuse, unit_of_work

log = structlog.get_logger("charter.batches")

READERS = ("admin", "auditor")  # may read every batch and file; others their own


class BatchRequestError(CharterError):
    status = 400
    code = "invalid_request"


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


# --- files ----------------------------------------------------------------------------------

def upload_file(actor: Actor, settings: Settings, *, filename: str, purpose: str,
                content: bytes) -> StoredFile:
    """Keep a batch input file; every line is checked now and counted (invalid lines are
    reported in the error file of each batch that uses the file)."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    try:
        if purpose != "batch":
            raise BatchRequestError("`purpose` must be batch (the only kind Charter keeps)",
                                    code="invalid_purpose", details={"purpose": purpose[:50]})
        if not name or len(name) > 255 or not name.isprintable():
            raise BatchRequestError("the file needs a name of at most 255 printable characters",
                                    code="invalid_filename")
        lines = jsonl.parse(content, max_lines=settings.batch_max_lines,
                            max_tokens=settings.dispatch_max_new_tokens)
    except CharterError as exc:
        refuse(exc.audited(actor.ref, "file.upload", "file", name[:200] or "-"))
    invalid = sum(1 for line in lines if not line.valid)
    digest = hashlib.sha256(content).hexdigest()
    with unit_of_work() as session:
        stored = StoredFile(id=new_id("file-"), owner_user_id=actor.user_id, purpose=purpose,
                            filename=name, bytes=len(content), sha256=digest, lines=len(lines),
                            invalid_lines=invalid, content=content, created_at=utcnow())
        session.add(stored)
        session.flush()
        record(session, actor=actor.ref, action="file.uploaded", target_type="file",
                     target_id=stored.id,
                     details={"filename": name, "purpose": purpose, "bytes": len(content),
                              "sha256": digest, "lines": len(lines), "invalid_lines": invalid})
    return stored


def visible_file(session: Session, actor: Actor, file_id: str) -> StoredFile:
    stored = session.get(StoredFile, file_id)
    if (stored is None or stored.purged_at is not None
            or (stored.owner_user_id != actor.user_id and not actor.has(*READERS))):
        raise NotFoundError(f"no file {file_id}", code="file_not_found")
    return stored


def require_owner(actor: Actor, owner_user_id: str, action: str, target_type: str,
                  target_id: str) -> None:
    """Readers (auditors) see everyone's files and batches; only the owner or an admin
    changes them."""
    if owner_user_id != actor.user_id and not actor.has("admin"):
        refuse(ForbiddenError(f"only its owner or an admin may change this {target_type}",
                              code="forbidden").audited(actor.ref, action, target_type,
                                                        target_id))


def get_file(actor: Actor, file_id: str) -> StoredFile:
    with unit_of_work() as session:
        return visible_file(session, actor, file_id)


def list_files(actor: Actor, *, purpose: str | None = None, limit: int = 100,
               after: str | None = None) -> list[StoredFile]:
    with unit_of_work() as session:
        stmt = select(StoredFile).where(StoredFile.purged_at.is_(None))
        if not actor.has(*READERS):
            stmt = stmt.where(StoredFile.owner_user_id == actor.user_id)
        if purpose:
            stmt = stmt.where(StoredFile.purpose == purpose)
        if after:
            cursor = session.get(StoredFile, after)
            if cursor is not None:
                stmt = stmt.where((StoredFile.created_at < cursor.created_at) | (
                    (StoredFile.created_at == cursor.created_at) & (StoredFile.id < after)))
        stmt = stmt.order_by(StoredFile.created_at.desc(), StoredFile.id.desc()).limit(limit)
        return list(session.scalars(stmt))


def file_content(actor: Actor, file_id: str) -> tuple[StoredFile, bytes]:
    with unit_of_work() as session:
        stored = visible_file(session, actor, file_id)
        content = session.scalar(select(StoredFile.content).where(StoredFile.id == file_id))
        return stored, content or b""


def delete_file(actor: Actor, file_id: str) -> StoredFile:
    """Remove a file's content (its row, digest and audit trail stay). A file that a
    running batch reads cannot be deleted."""
    with unit_of_work() as session:
        stored = visible_file(session, actor, file_id)
        require_owner(actor, stored.owner_user_id, "file.delete", "file", file_id)
        busy = session.scalar(select(Batch.id).where(
            Batch.input_file_id == file_id, Batch.status.in_(ACTIVE_BATCH_STATES)).limit(1))
        if busy:
            refuse(ConflictError(f"batch {busy} is still reading this file", code="file_in_use",
                                 details={"batch_id": busy}).audited(
                actor.ref, "file.delete", "file", file_id))
        _purge(session, stored, actor.ref, "file.deleted")
        return stored


def _purge(session: Session, stored: StoredFile, actor_ref: str, action: str) -> None:
    stored.content = None
    stored.purged_at = utcnow()
    record(session, actor=actor_ref, action=action, target_type="file", target_id=stored.id,
                 details={"filename": stored.filename, "purpose": stored.purpose,
                          "sha256": stored.sha256, "bytes": stored.bytes})


def purge_expired_files(settings: Settings, now: datetime | None = None) -> list[str]:
    """Retention: remove the content of batch files older than `file_retention_days`
    whose batches are over (audited per file as `file.purged`)."""
    cutoff = (now or utcnow()) - timedelta(days=settings.file_retention_days)
    purged: list[str] = []
    with unit_of_work() as session:
        active = select(Batch.input_file_id).where(Batch.status.in_(ACTIVE_BATCH_STATES))
        for stored in session.scalars(select(StoredFile).where(
                StoredFile.purged_at.is_(None), StoredFile.created_at < cutoff,
                StoredFile.id.not_in(active)).limit(1000)):
            _purge(session, stored, SYSTEM.ref, "file.purged")
            purged.append(stored.id)
    return purged


def file_view(stored: StoredFile) -> dict[str, Any]:
    details = None
    if stored.invalid_lines:
        details = (f"{stored.invalid_lines} of {stored.lines} lines are invalid; each batch "
                   "reports them in its error file")
    return {"id": stored.id, "object": "file", "bytes": stored.bytes,
            "created_at": ts(stored.created_at), "filename": stored.filename,
            "purpose": stored.purpose, "status": "processed", "status_details": details,
            "expires_at": None, "sha256": stored.sha256, "lines": stored.lines,
            "invalid_lines": stored.invalid_lines}
