"""Investigation captures: a team's prompts and answers recorded, only when an auditor
approved it, for a bounded time, encrypted under a key the database never sees.

Without a running capture Charter keeps no prompt or answer anywhere. A capture is asked
for by an admin, with a reason, a window (at most CHARTER_CAPTURE_MAX_HOURS) and a
retention (at most CHARTER_CAPTURE_MAX_RETAIN_DAYS after the window), and approved or
rejected by an auditor who did not ask for it (four eyes). Approval makes the capture's
data key (32 random bytes), wraps it with the key-encryption key of
CHARTER_CAPTURE_KEY_FILE (AES key wrap, RFC 3394) and stores only the wrapped key and the
KEK's fingerprint. Each captured request is one record: the request as its caller sent
it, the answer as the node generated it, what was replaced in either, sealed with
AES-256-GCM under the data key, the capture's and the record's ids as associated data (a
record moved to another capture, or another row, does not open). Reading records is for
auditors, and every read is an audit event. After retention the records are deleted and
the wrapped key destroyed (`capture.purged`); the audit trail of the capture stays. A
database backup taken during the retention holds the wrapped key beside the records, so
it opens with the key-encryption key for as long as that key lives: keep backups no
longer than captures, or rotate the key-encryption key (docs/inspection.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import column, delete, func, select, table
from sqlalchemy.orm import Session

from charter import scope
from charter.actor import SYSTEM, Actor
from charter.db import utcnow
from charter.errors import (
    CharterError,
    ConflictError,
    IllegalTransitionError,
    NotFoundError,
    SelfApprovalError,
    StaleVersionError,
    ValidationFailedError,
)
from charter.inspection.models import Capture, CaptureRecord
from charter.uow import record, refuse, unit_of_work

log = structlog.get_logger("charter.inspection")

MIN_REASON = 20  # characters: an investigation says why
READ_LIMIT = 500  # records a read returns at most (the rest with `before`)
_teams = table("teams", column("id"), column("name"))  # identity's, read by id only


class CaptureKeyError(CharterError):
    """The key-encryption key is not configured, unreadable, or not the one that wrapped
    this capture's data key: nothing can be sealed or opened."""

    status = 503
    code = "capture_key_unavailable"


@dataclass(frozen=True, slots=True)
class RunningCapture:
    """What the request path needs of a team's running capture (cached per generation)."""

    id: str
    starts_at: datetime
    ends_at: datetime
    key_id: str
    wrapped_key: bytes

    def running(self, now: datetime) -> bool:
        return self.starts_at <= now < self.ends_at


# --- the key-encryption key ------------------------------------------------------------

def load_kek(path: str) -> tuple[str, bytes]:
    """The KEK in `path` and its fingerprint (`kek-` and 16 hex digits of its SHA-256):
    32 bytes, as base64 or hex text, or raw. CaptureKeyError when it is none of these."""
    if not path:
        raise CaptureKeyError("no capture key is configured (CHARTER_CAPTURE_KEY_FILE): "
                              "captures cannot be approved or read")
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CaptureKeyError(f"the capture key file cannot be read: {exc.strerror}",
                              details={"file": path}) from None
    key = raw if len(raw) == 32 else _decoded(raw.strip())
    if key is None:
        raise CaptureKeyError("the capture key file must hold 32 bytes (raw, hex or base64)",
                              details={"file": path})
    return "kek-" + hashlib.sha256(key).hexdigest()[:16], key


def _decoded(text: bytes) -> bytes | None:
    for decode in (binascii.unhexlify, base64.b64decode, base64.urlsafe_b64decode):
        try:
            key = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(key) == 32:
            return key
    return None


class _Keys:
    """A process's opened data keys, by capture id (unwrapped once, on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, Any] = {}

    def aead(self, capture_id: str, key_id: str | None, wrapped: bytes | None) -> Any:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

        with self._lock:
            found = self._open.get(capture_id)
        if found is not None:
            return found
        if wrapped is None or key_id is None:
            raise CaptureKeyError("this capture's data key is gone (purged, or never made)",
                                  code="capture_key_destroyed", status=409)
        kek_id, kek = load_kek(scope.current().settings.capture_key_file)
        if kek_id != key_id:
            raise CaptureKeyError(
                f"this capture's data key was wrapped by {key_id}; the configured key is "
                f"{kek_id}", details={"key_id": key_id, "configured": kek_id})
        try:
            aead = AESGCM(aes_key_unwrap(kek, wrapped))
        except InvalidUnwrap:
            raise CaptureKeyError("this capture's wrapped data key does not open with the "
                                  "configured key") from None
        with self._lock:
            self._open[capture_id] = aead
        return aead

    def forget(self, capture_id: str) -> None:
        with self._lock:
            self._open.pop(capture_id, None)


def _keys() -> _Keys:
    return scope.current().part("capture_keys", lambda rt: _Keys())


def _aad(capture_id: str, record_id: str) -> bytes:
    return f"charter-capture:{capture_id}:{record_id}".encode()


# --- asking, deciding, ending ------------------------------------------------------------

def request_capture(actor: Actor, *, team_id: str, reason: str, hours: int,
                    retain_days: int) -> Capture:
    """An admin asks to record a team's requests; nothing is recorded until an auditor
    approves (capture.requested)."""
    actor.require("admin", action="capture.request", target_type="team", target_id=team_id)
    settings = scope.current().settings
    problems = []
    if len(reason.strip()) < MIN_REASON:
        problems.append({"field": "reason", "code": "too_short", "message":
                         f"say why, in at least {MIN_REASON} characters"})
    if not 1 <= hours <= settings.capture_max_hours:
        problems.append({"field": "hours", "code": "out_of_range", "message":
                         f"a capture records for 1 to {settings.capture_max_hours} hours"})
    if not 1 <= retain_days <= settings.capture_max_retain_days:
        problems.append({"field": "retain_days", "code": "out_of_range", "message":
                         f"records are kept 1 to {settings.capture_max_retain_days} days"})
    with unit_of_work() as session:
        # The team's row, locked: two admins asking at once wait on each other, so the
        # one-capture-a-team check below sees the other's.
        team = session.execute(select(_teams.c.name).where(_teams.c.id == team_id)
                               .with_for_update()).first()
        if team is None:
            raise NotFoundError(f"team {team_id} not found")
        if problems:
            raise ValidationFailedError("the capture request is invalid",
                                        details={"errors": problems})
        now = utcnow()
        open_ = session.scalars(select(Capture).where(
            Capture.team_id == team_id, Capture.state.in_(("requested", "approved")))).all()
        if any(c.state == "requested" or (c.ends_at is not None and c.ends_at > now)
               for c in open_):
            raise ConflictError("this team already has a capture asked for or running",
                                code="capture_exists")
        row = Capture(id=str(uuid.uuid4()), team_id=team_id, reason=reason.strip(),
                      hours=hours, retain_days=retain_days, state="requested",
                      requested_by=actor.ref, requested_by_user_id=actor.user_id,
                      requested_at=now, row_version=1)
        session.add(row)
        session.flush()
        record(session, actor=actor.ref, action="capture.requested", target_type="capture",
               target_id=row.id, details={"team_id": team_id, "team": team.name,
                                          "reason": row.reason, "hours": hours,
                                          "retain_days": retain_days})
        return row


def decide_capture(actor: Actor, capture_id: str, *, approve: bool, note: str,
                   row_version: int) -> Capture:
    """An auditor other than whoever asked approves (the window starts now; the data key
    is made and wrapped) or rejects (capture.approved, capture.rejected)."""
    action = "capture.approved" if approve else "capture.rejected"
    actor.require("auditor", action=action, target_type="capture", target_id=capture_id)
    key_id, kek = (load_kek(scope.current().settings.capture_key_file) if approve
                   else ("", b""))
    with unit_of_work() as session:
        row = _locked(session, capture_id, row_version, actor, action)
        if row.state != "requested":
            raise IllegalTransitionError(
                f"this capture is {row.state}: only a requested capture is decided",
                details={"state": row.state}).audited(actor.ref, action, "capture", row.id)
        if row.requested_by_user_id == actor.user_id:
            raise SelfApprovalError(
                "four-eyes rule: whoever asked for a capture cannot decide on it",
                details={"rule": "four_eyes"}).audited(actor.ref, action, "capture", row.id)
        now = utcnow()
        row.decided_by, row.decided_at, row.decision_note = actor.ref, now, note.strip()
        details: dict[str, Any] = {"team_id": row.team_id, "note": row.decision_note}
        if approve:
            from cryptography.hazmat.primitives.keywrap import aes_key_wrap

            row.state, row.starts_at = "approved", now
            row.ends_at = now + timedelta(hours=row.hours)
            row.purge_after = row.ends_at + timedelta(days=row.retain_days)
            row.key_id, row.wrapped_key = key_id, aes_key_wrap(kek, os.urandom(32))
            details.update(starts_at=now.isoformat(), ends_at=row.ends_at.isoformat(),
                           purge_after=row.purge_after.isoformat(), key_id=key_id)
        else:
            row.state = "rejected"
        row.row_version += 1
        session.flush()
        record(session, actor=actor.ref, action=action, target_type="capture", target_id=row.id,
               details=details)
        return row


def revoke_capture(actor: Actor, capture_id: str, *, note: str, row_version: int) -> Capture:
    """An admin or an auditor ends a running capture now (capture.revoked); its records
    are kept for its retention, counted from now."""
    actor.require("admin", "auditor", action="capture.revoked", target_type="capture",
                  target_id=capture_id)
    with unit_of_work() as session:
        row = _locked(session, capture_id, row_version, actor, "capture.revoked")
        now = utcnow()
        if row.state != "approved" or row.ends_at is None or row.ends_at <= now:
            raise IllegalTransitionError(
                "only a running capture is revoked", details={"state": row.state}).audited(
                actor.ref, "capture.revoked", "capture", row.id)
        row.state, row.revoked_by, row.revoked_at, row.ends_at = "revoked", actor.ref, now, now
        row.purge_after = now + timedelta(days=row.retain_days)
        row.decision_note = note.strip() or row.decision_note
        row.row_version += 1
        session.flush()
        record(session, actor=actor.ref, action="capture.revoked", target_type="capture",
               target_id=row.id, details={"team_id": row.team_id, "note": note.strip(),
                                          "purge_after": row.purge_after.isoformat()})
        return row


def _locked(session: Session, capture_id: str, row_version: int, actor: Actor,
            action: str) -> Capture:
    row = session.get(Capture, capture_id, with_for_update=True)
    if row is None:
        raise NotFoundError(f"capture {capture_id} not found")
    if row.row_version != row_version:
        raise StaleVersionError(
            "the capture changed since you read it; read it again",
            details={"row_version": row.row_version}).audited(
            actor.ref, action, "capture", capture_id)
    return row


def list_captures(actor: Actor, team_id: str | None = None) -> list[Capture]:
    actor.require("admin", "auditor", action="capture.list", target_type="capture",
                  target_id="*")
    with unit_of_work() as session:
        query = select(Capture).order_by(Capture.requested_at.desc())
        if team_id is not None:
            query = query.where(Capture.team_id == team_id)
        return list(session.scalars(query).all())


def get_capture(actor: Actor, capture_id: str) -> Capture:
    actor.require("admin", "auditor", action="capture.get", target_type="capture",
                  target_id=capture_id)
    with unit_of_work() as session:
        row = session.get(Capture, capture_id)
        if row is None:
            raise NotFoundError(f"capture {capture_id} not found")
        return row


def record_counts(capture_ids: list[str]) -> dict[str, int]:
    """How many records each capture holds (counts only: nothing is opened)."""
    if not capture_ids:
        return {}
    with unit_of_work() as session:
        rows = session.execute(select(CaptureRecord.capture_id, func.count()).where(
            CaptureRecord.capture_id.in_(capture_ids)).group_by(CaptureRecord.capture_id))
        return {capture_id: n for capture_id, n in rows}


# --- recording and reading ------------------------------------------------------------------

def running(team_id: str, now: datetime | None = None) -> RunningCapture | None:
    """The team's approved capture whose window holds `now` (or is still to come, for the
    cache: RunningCapture.running decides at the request), else None."""
    now = now or utcnow()
    with unit_of_work() as session:
        row = session.scalars(select(Capture).where(
            Capture.team_id == team_id, Capture.state == "approved",
            Capture.ends_at > now).order_by(Capture.ends_at.desc()).limit(1)).first()
        if row is None or row.key_id is None or row.wrapped_key is None:
            return None
        assert row.starts_at is not None and row.ends_at is not None
        return RunningCapture(row.id, row.starts_at, row.ends_at, row.key_id, row.wrapped_key)


def seal(capture: RunningCapture, *, serving_name: str, decision_id: str,
         request_id: str | None, content: dict[str, Any]) -> str:
    """Write one encrypted record of `capture` (its own transaction); the record's id."""
    record_id = str(uuid.uuid4())
    aead = _keys().aead(capture.id, capture.key_id, capture.wrapped_key)
    nonce = os.urandom(12)
    sealed = aead.encrypt(nonce, json.dumps(content, ensure_ascii=False).encode(),
                          _aad(capture.id, record_id))
    with unit_of_work() as session:
        session.add(CaptureRecord(id=record_id, capture_id=capture.id, created_at=utcnow(),
                                  serving_name=serving_name, decision_id=decision_id,
                                  request_id=request_id, nonce=nonce, ciphertext=sealed))
    return record_id


def read_records(actor: Actor, capture_id: str, *, limit: int = 100,
                 before: datetime | None = None) -> list[dict[str, Any]]:
    """An auditor opens a capture's records, newest first (capture.read: which records,
    by whom; never their content). A record that does not open is named, not skipped."""
    actor.require("auditor", action="capture.read", target_type="capture",
                  target_id=capture_id)
    limit = max(1, min(limit, READ_LIMIT))
    with unit_of_work() as session:
        row = session.get(Capture, capture_id)
        if row is None:
            raise NotFoundError(f"capture {capture_id} not found")
        if row.state == "purged":
            refuse(ConflictError("this capture's records were purged", code="capture_purged",
                                 details={"purged_at": row.purged_at.isoformat()
                                          if row.purged_at else None}).audited(
                actor.ref, "capture.read", "capture", capture_id))
        query = select(CaptureRecord).where(CaptureRecord.capture_id == capture_id)
        if before is not None:
            query = query.where(CaptureRecord.created_at < before)
        records = list(session.scalars(query.order_by(CaptureRecord.created_at.desc())
                                       .limit(limit)).all())
        key_id, wrapped = row.key_id, row.wrapped_key
    aead: Any = None
    try:
        if records:
            aead = _keys().aead(capture_id, key_id, wrapped)
    except CaptureKeyError as exc:
        refuse(exc.audited(actor.ref, "capture.read", "capture", capture_id))
    out = []
    for r in records:
        item: dict[str, Any] = {"id": r.id, "created_at": r.created_at,
                                "serving_name": r.serving_name, "decision_id": r.decision_id,
                                "request_id": r.request_id}
        try:
            item["content"] = json.loads(aead.decrypt(r.nonce, r.ciphertext,
                                                      _aad(capture_id, r.id)))
        except Exception:  # noqa: BLE001 - InvalidTag: altered, moved, or another key
            item["content"], item["error"] = None, "record_does_not_open"
        out.append(item)
    with unit_of_work() as session:
        record(session, actor=actor.ref, action="capture.read", target_type="capture",
               target_id=capture_id,
               details={"records": len(out), "record_ids": [i["id"] for i in out][:READ_LIMIT],
                        "unopened": sum(1 for i in out if "error" in i)})
    return out


def purge_due(now: datetime | None = None) -> int:
    """Delete the records of every capture past its retention and destroy its wrapped data
    key (capture.purged, with how many records went). Returns the captures purged."""
    now = now or utcnow()
    done = 0
    with unit_of_work() as session:
        due = session.scalars(select(Capture).where(
            Capture.state.in_(("approved", "revoked")), Capture.purge_after <= now)
            .with_for_update()).all()
        for row in due:
            deleted = session.execute(delete(CaptureRecord).where(
                CaptureRecord.capture_id == row.id)).rowcount  # type: ignore[attr-defined]
            row.state, row.purged_at, row.wrapped_key = "purged", now, None
            row.row_version += 1
            record(session, actor=SYSTEM.ref, action="capture.purged",
                   target_type="capture", target_id=row.id,
                   details={"team_id": row.team_id, "records_deleted": deleted,
                            "key_id": row.key_id, "purge_after": row.purge_after.isoformat()
                            if row.purge_after else None})
            done += 1
    for row in due:
        _keys().forget(row.id)
    return done
