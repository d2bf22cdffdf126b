"""Audit service: query the log, verify the chain, export bundles. (Events are written
through charter.uow's doors, by charter.audit.journal.)"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from charter import scope
from charter.audit.chain import (
    GENESIS_HASH,
    ChainRow,
    Tombstone,
    Verdict,
    verify_rows,
)
from charter.audit.models import AuditEvent, AuditPurged
from charter.db import table_of
from charter.errors import CharterError, ValidationFailedError
from charter.uow import record, refuse, unit_of_work

if TYPE_CHECKING:
    from charter.audit.bundle import ExportResult, Selection
    from charter.settings import Settings

@dataclass(frozen=True, slots=True)
class EventFilter:
    actor: str | None = None
    action: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    outcome: str | None = None
    request_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_seq: int = 0
    limit: int = 100


def list_events(flt: EventFilter) -> list[AuditEvent]:
    """Events matching the filter in sequence order, after `after_seq` (keyset paging)."""
    if flt.since and flt.until and flt.since > flt.until:
        raise ValidationFailedError(
            "`since` is after `until`",
            details={"errors": [{"field": "since", "code": "range", "message": "after until"}]},
        )
    stmt = select(AuditEvent).where(AuditEvent.seq > flt.after_seq)
    for column, value in (
        (AuditEvent.actor, flt.actor),
        (AuditEvent.action, flt.action),
        (AuditEvent.target_type, flt.target_type),
        (AuditEvent.target_id, flt.target_id),
        (AuditEvent.outcome, flt.outcome),
        (AuditEvent.request_id, flt.request_id),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    if flt.since is not None:
        stmt = stmt.where(AuditEvent.ts >= flt.since)
    if flt.until is not None:
        stmt = stmt.where(AuditEvent.ts < flt.until)
    stmt = stmt.order_by(AuditEvent.seq).limit(flt.limit)
    with unit_of_work() as session:
        return list(session.scalars(stmt))


def iter_events(flt: EventFilter, *, through_seq: int | None = None) -> Iterator[AuditEvent]:
    """Every event matching the filter from `flt.after_seq` on, in seq order, read in
    keyset pages of `flt.limit`, stopping after `through_seq`."""
    after = flt.after_seq
    while True:
        page = list_events(dataclasses.replace(flt, after_seq=after))
        for event in page:
            if through_seq is not None and event.seq > through_seq:
                return
            yield event
        if len(page) < flt.limit:
            return
        after = page[-1].seq


def head() -> tuple[int, str]:
    """(number of events, head hash) as stored, without verifying."""
    with unit_of_work() as session:
        seq, prev = _peek_head(session)
        return seq, prev


def _peek_head(session: Session) -> tuple[int, str]:
    row = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    return (0, GENESIS_HASH) if row is None else (row.seq, row.hash)


def verify_chain(batch: int = 5000) -> Verdict:
    """Walk the whole chain in the database, streaming rows in seq order (purged events by
    their tombstones)."""
    database = scope.current().database
    with database.engine.connect() as conn:
        table = table_of(AuditEvent)
        purged = table_of(AuditPurged)
        cols = [table.c[name] for name in ChainRow.__slots__]

        def rows() -> Iterator[ChainRow]:
            result = conn.execution_options(stream_results=True, yield_per=batch).execute(
                select(*cols).order_by(table.c.seq)
            )
            for r in result:
                yield ChainRow(*r)

        def tombstones() -> Iterator[Tombstone]:
            after = 0
            while True:  # pages on the same connection, beside the events' stream
                page = conn.execute(select(purged.c.seq, purged.c.prev_hash, purged.c.hash)
                                    .where(purged.c.seq > after).order_by(purged.c.seq)
                                    .limit(batch)).all()
                yield from (Tombstone(*r) for r in page)
                if len(page) < batch:
                    return
                after = page[-1][0]

        def seq_of_hash(h: str) -> int | None:
            return conn.execute(select(table.c.seq).where(table.c.hash == h)).scalar()

        merged: Iterator[ChainRow | Tombstone] = heapq.merge(
            rows(), tombstones(), key=lambda r: r.seq)
        return verify_rows(merged, seq_of_hash=seq_of_hash)


def export_bundle(settings: Settings, selection: Selection, out: IO[bytes], *,
                  actor_ref: str, compress: bool = True) -> ExportResult:
    """Write an export bundle and record who exported what (`audit.export`); a refused
    export is recorded too."""
    from charter.audit import bundle

    try:
        result = bundle.export(settings, selection, out, compress=compress)
    except CharterError as exc:
        exc.details.setdefault("selection", selection.describe())
        refuse(exc.audited(actor_ref, "audit.export", "audit", "bundle"))
    with unit_of_work() as session:
        record(session, actor=actor_ref, action="audit.export", target_type="audit",
                     target_id="bundle",
                     details={"selection": selection.describe(), "events": result.events,
                              "checkpoints": result.checkpoints,
                              "tree_size": result.tree_size,
                              "manifest_sha256": result.manifest_sha256})
    return result
