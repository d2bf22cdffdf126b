"""The audit log's write side: the Event value, and appending it to the hash chain.

Nothing here opens a transaction: `append(session, event)` writes into the caller's.
Services reach it through charter.uow (`record`, and refusals after a rollback), which
finds it on the Runtime (`JOURNAL`, handed over by charter.boot: core imports no domain);
the gateway's group writer (charter.audit.writer) chains batches of Events itself.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from charter import scope
from charter.audit.chain import GENESIS_HASH, canonical_json, hash_parts, joined_hash
from charter.audit.models import AuditEvent
from charter.db import table_of, utcnow
from charter.errors import ValidationFailedError

OUTCOMES = ("success", "denied", "failure")
# Any fixed 64-bit number; every audit writer serializes on it until its commit.
CHAIN_LOCK_KEY = 0x43484152544552  # "CHARTER"

COLUMN_LIMITS = {name: table_of(AuditEvent).c[name].type.length  # type: ignore[attr-defined]
                 for name in ("actor", "action", "target_type", "target_id", "outcome",
                              "request_id")}


class UnstorableEventError(ValueError):
    """A field the audit columns cannot hold (too long, a NUL character)."""


@dataclass(frozen=True, slots=True)
class Event:
    actor: str
    action: str
    target_type: str
    target_id: str
    outcome: str
    details: dict[str, Any]
    request_id: str | None
    details_json: bytes  # RFC 8785 bytes of `details`: hashed and stored as they are
    parts: tuple[str, str, str, str]  # the rest of its canonical bytes (chain.hash_parts)
    event_id: str  # unique; starts with the clock (ms) when it was made
    seal: str | None  # "<epoch>.<HMAC>" (charter.audit.seal); None without a sealing key

    @classmethod
    def of(cls, *, actor: str, action: str, target_type: str, target_id: str,
           outcome: str = "success", details: dict[str, Any] | None = None,
           request_id: str | None = None) -> Event:
        """`request_id` defaults to the bound request's (charter.scope); give it where the
        event is made outside the request, e.g. after a stream's last byte."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown audit outcome {outcome!r}")
        details = details or {}
        request_id = request_id or scope.request_id()
        for name, value in (("actor", actor), ("action", action), ("target_type", target_type),
                            ("target_id", target_id), ("outcome", outcome),
                            ("request_id", request_id)):
            # What the columns cannot hold would fail the whole batch it shares.
            if value is not None and (len(value) > COLUMN_LIMITS[name] or "\x00" in value):
                raise UnstorableEventError(f"audit {name} too long or with a NUL character")
        # Refuses what is not plain JSON before anything is queued; made once, reused.
        details_json = canonical_json(details)
        parts = hash_parts(actor=actor, action=action, target_type=target_type,
                           target_id=target_id, outcome=outcome, request_id=request_id)
        runtime = scope.maybe_current()
        sealer = runtime.sealer if runtime is not None else None
        if sealer is not None:
            pre, post, mid, tail = parts  # sealed: the content without seq, ts, prev_hash
            event_id, seal = sealer.seal(b"".join(
                (pre.encode(), details_json, post.encode(), mid.encode(), tail.encode())))
        else:
            event_id, seal = f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}", None
        return cls(actor, action, target_type, target_id, outcome, details, request_id,
                   details_json, parts, event_id, seal)


def lock_head(session: Session) -> tuple[int, str]:
    """Serialize chain writers and return (next seq, previous hash).

    PostgreSQL: a transaction-scoped advisory lock, held until commit, so no two
    transactions can read the same head. SQLite: BEGIN IMMEDIATE already holds the
    database's single write lock (see charter.db).
    """
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        # Two statements on purpose: a single one would take its snapshot before the lock
        # is granted and could read a stale head.
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({CHAIN_LOCK_KEY})")
    head = conn.exec_driver_sql(
        "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1").first()
    if head is None:
        return 1, GENESIS_HASH
    return head[0] + 1, head[1]


def append(session: Session, event: Event) -> tuple[int, str]:
    """Chain `event` into the caller's transaction; returns (seq, hash).

    Everything between taking the chain lock and the commit is kept lean (two plain
    statements and one Core INSERT): every other writer waits that long.
    """
    seq, prev_hash = lock_head(session)
    ts = utcnow()
    digest = joined_hash(event.parts, event.details_json, seq=seq, ts=ts, prev_hash=prev_hash)
    session.execute(insert(table_of(AuditEvent)), [{
        "seq": seq, "ts": ts, "actor": event.actor, "action": event.action,
        "target_type": event.target_type, "target_id": event.target_id,
        "outcome": event.outcome, "details": event.details, "request_id": event.request_id,
        "prev_hash": prev_hash, "hash": digest, "event_id": event.event_id,
        "seal": event.seal,
    }])
    return seq, digest


class Journal:
    """What charter.uow writes through (charter.runtime.Journal): stateless."""

    def event(self, *, actor: str, action: str, target_type: str, target_id: str,
              outcome: str = "success", details: dict[str, Any] | None = None) -> Event:
        """An event of the bound request; what the columns cannot hold is the caller's
        input, refused as such (validation_failed, out_of_range)."""
        try:
            return Event.of(actor=actor, action=action, target_type=target_type,
                            target_id=target_id, outcome=outcome, details=details)
        except UnstorableEventError as exc:
            raise ValidationFailedError(
                "a value is out of range for what Charter stores",
                details={"errors": [{"field": "body", "code": "out_of_range",
                                     "message": str(exc)}]}) from None

    def append(self, session: Session, event: Event) -> tuple[int, str]:
        return append(session, event)


JOURNAL = Journal()

