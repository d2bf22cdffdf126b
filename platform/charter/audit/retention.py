"""Retention: dispatch events older than `audit_retention_days` are purged, but only those a
signed checkpoint already covers, and each leaves a tombstone (its sequence number, links and
hash) so the chain, the Merkle tree and every proof of the events that remain still verify.

Purged: `dispatch.*` events and the policy decisions taken for them (`policy.decide` on a
deployment). Kept for good: everything else (registry, approvals, identity, nodes, exports,
the purges themselves). Each purge run is one transaction that also writes its
`audit.purge` event; the database refuses to delete an event without its tombstone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, func, insert, or_, select

from charter.audit.models import AuditCheckpoint, AuditEvent, AuditPurged
from charter.db import table_of, utcnow
from charter.settings import Settings
from charter.uow import record, unit_of_work

ACTOR = "system:retention"


@dataclass(frozen=True)
class PurgeResult:
    events: int
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoint_size: int = 0


def purgeable() -> ColumnElement[bool]:
    t = table_of(AuditEvent)
    return or_(t.c.action.like("dispatch.%"),
               and_(t.c.action == "policy.decide", t.c.target_type == "deployment"))


def purge(settings: Settings, *, now: datetime | None = None, batch: int = 5000,
          max_batches: int = 20) -> PurgeResult:
    """Purge what retention allows, up to `max_batches` transactions of `batch` events."""
    if settings.audit_retention_days <= 0:
        return PurgeResult(0)
    cutoff = (now or utcnow()) - timedelta(days=settings.audit_retention_days)
    total, first, last, signed = 0, None, None, 0
    for _ in range(max_batches):
        done = _purge_batch(cutoff, batch)
        if not done.events:
            break
        total += done.events
        first = done.first_seq if first is None else first
        last, signed = done.last_seq, done.checkpoint_size
        if done.events < batch:
            break
    return PurgeResult(total, first, last, signed)


def _purge_batch(cutoff: datetime, batch: int) -> PurgeResult:
    t = table_of(AuditEvent)
    with unit_of_work() as session:
        conn = session.connection()
        signed = conn.execute(select(func.max(AuditCheckpoint.size))).scalar() or 0
        # The newest event is never purged: every reader of the log's head finds it.
        newest = conn.execute(select(func.max(t.c.seq))).scalar() or 0
        rows = conn.execute(
            select(t.c.seq, t.c.ts, t.c.action, t.c.prev_hash, t.c.hash)
            .where(t.c.seq <= signed, t.c.seq < newest, t.c.ts < cutoff, purgeable())
            .order_by(t.c.seq).limit(batch)).all()
        if not rows:
            return PurgeResult(0)
        now = utcnow()
        conn.execute(insert(table_of(AuditPurged)), [
            {"seq": r.seq, "ts": r.ts, "action": r.action, "prev_hash": r.prev_hash,
             "hash": r.hash, "purged_at": now, "checkpoint_size": signed} for r in rows])
        seqs = [r.seq for r in rows]
        conn.execute(delete(t).where(t.c.seq.in_(seqs)))
        record(session, actor=ACTOR, action="audit.purge", target_type="audit",
                     target_id="events",
                     details={"events": len(seqs), "first_seq": seqs[0], "last_seq": seqs[-1],
                              "older_than": cutoff.isoformat(), "checkpoint_size": signed})
        return PurgeResult(len(seqs), seqs[0], seqs[-1], signed)
