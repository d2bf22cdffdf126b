"""Findings of inspected requests by UTC day, team and type, counted from the audit log.

Every `policy.decide` event of an inspected request carries `findings` (type -> count,
possibly `{}`) and `team` (the caller's team name, or null); nothing else of the content
reaches the log, so nothing else is counted. `rollup` reads the events after a watermark
(`inspection_rollup`) and adds them into `inspection_counts`; the watermark moves in the
same transaction as the counts, with its row locked, so an event is counted once however
many processes roll up. Run by the maintenance task and before each read (`report`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from charter.actor import Actor
from charter.audit.models import AuditEvent
from charter.db import utcnow
from charter.errors import ValidationFailedError
from charter.inspection.models import InspectionCount, InspectionRollup
from charter.uow import unit_of_work

READERS = ("admin", "auditor")
DECIDE = "policy.decide"
DEFAULT_DAYS = 30
MAX_DAYS = 365
WATERMARK_ID = 1  # the single row of inspection_rollup

Key = tuple[date, str, str]  # (UTC day, team name or "", type)


@dataclass(frozen=True, slots=True)
class CountRow:
    """One day's findings of one type in one team's requests."""

    day: date
    team: str | None  # None: callers without a team
    type: str
    requests: int  # decisions whose request carried the type at least once
    findings: int  # how many times it was found in them


@dataclass(frozen=True, slots=True)
class TypeTotal:
    type: str
    requests: int
    findings: int


@dataclass(frozen=True, slots=True)
class TeamTotal:
    """A team's findings over the window. No request count: a request carrying two types
    is in two rows, so requests do not add up across types."""

    team: str | None
    findings: int


@dataclass(frozen=True, slots=True)
class Report:
    since: date
    until: date
    rows: tuple[CountRow, ...]
    by_type: tuple[TypeTotal, ...]
    by_team: tuple[TeamTotal, ...]


# --- the rollup ------------------------------------------------------------------------------

def rollup(limit: int = 5000) -> int:
    """Count the events written since the last rollup, `limit` a transaction, until none
    is left; returns how many events were read (of any action)."""
    if limit < 1:
        raise ValueError("the rollup reads at least one event a transaction")
    read = 0
    while True:
        n = _rollup_chunk(limit)
        read += n
        if n < limit:
            return read


def _rollup_chunk(limit: int) -> int:
    with unit_of_work() as session:
        # On PostgreSQL a second rollup waits here until this one committed, then reads
        # the watermark this one left; SQLite's BEGIN IMMEDIATE serializes it already.
        mark = session.scalars(select(InspectionRollup).where(
            InspectionRollup.id == WATERMARK_ID).with_for_update()).first()
        if mark is None:  # a schema made without migration 0027's row
            mark = InspectionRollup(id=WATERMARK_ID, seq=0)
            session.add(mark)
            session.flush()
        events = session.execute(
            select(AuditEvent.seq, AuditEvent.ts, AuditEvent.action, AuditEvent.details)
            .where(AuditEvent.seq > mark.seq).order_by(AuditEvent.seq).limit(limit)).all()
        if not events:
            return 0
        _add(session, tally((e.ts, e.action, e.details) for e in events))
        mark.seq = events[-1].seq
        mark.updated_at = utcnow()
        return len(events)


def tally(events: Iterable[tuple[datetime, str, dict[str, Any]]]
          ) -> dict[Key, tuple[int, int]]:
    """(requests, findings) by (UTC day, team, type) of these events' findings; events
    that are not an inspected request's decision add nothing."""
    requests: Counter[Key] = Counter()
    findings: Counter[Key] = Counter()
    for ts, action, details in events:
        found = details.get("findings") if action == DECIDE else None
        if not isinstance(found, dict):
            continue
        day, team = ts.astimezone(UTC).date(), details.get("team") or ""
        for kind, n in found.items():
            if type(n) is int and n > 0:
                requests[(day, team, kind)] += 1
                findings[(day, team, kind)] += n
    return {key: (requests[key], findings[key]) for key in requests}


def _add(session: Session, added: dict[Key, tuple[int, int]]) -> None:
    """Add to the rows of these keys, making those not there yet (no two rollups run at
    once: see the watermark's lock)."""
    if not added:
        return
    key = tuple_(InspectionCount.day, InspectionCount.team, InspectionCount.type)
    existing = {(c.day, c.team, c.type): c for c in session.scalars(
        select(InspectionCount).where(key.in_(list(added))))}
    for (day, team, kind), (requests, findings) in added.items():
        row = existing.get((day, team, kind))
        if row is None:
            session.add(InspectionCount(day=day, team=team, type=kind, requests=requests,
                                        findings=findings))
        else:
            row.requests += requests
            row.findings += findings


# --- reading ---------------------------------------------------------------------------------

def window(days: int) -> tuple[date, date]:
    """The first and last UTC day of the last `days` days (today included)."""
    if not 1 <= days <= MAX_DAYS:
        raise ValidationFailedError(
            f"days must be 1 to {MAX_DAYS}", details={"errors": [
                {"field": "days", "code": "out_of_range",
                 "message": f"{days} is not between 1 and {MAX_DAYS}"}]})
    until = utcnow().date()
    return until - timedelta(days=days - 1), until


def counts(days: int = DEFAULT_DAYS, team: str | None = None) -> list[CountRow]:
    """The counted findings of the last `days` UTC days, newest first (then by team and
    type); `team`: only that team's (its name)."""
    return _rows(window(days)[0], team)


def _rows(since: date, team: str | None) -> list[CountRow]:
    query = select(InspectionCount).where(InspectionCount.day >= since)
    if team is not None:
        query = query.where(InspectionCount.team == team)
    with unit_of_work() as session:
        return [CountRow(c.day, c.team or None, c.type, c.requests, c.findings)
                for c in session.scalars(query.order_by(
                    InspectionCount.day.desc(), InspectionCount.team, InspectionCount.type))]


def totals(rows: Sequence[CountRow]) -> tuple[tuple[TypeTotal, ...], tuple[TeamTotal, ...]]:
    """Totals by type and by team, the largest number of findings first."""
    requests: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    by_team: Counter[str | None] = Counter()
    for r in rows:
        requests[r.type] += r.requests
        by_type[r.type] += r.findings
        by_team[r.team] += r.findings
    types = sorted((TypeTotal(k, requests[k], f) for k, f in by_type.items()),
                   key=lambda t: (-t.findings, t.type))
    teams = sorted((TeamTotal(k, f) for k, f in by_team.items()),
                   key=lambda t: (-t.findings, t.team or ""))
    return tuple(types), tuple(teams)


def report(actor: Actor, *, days: int = DEFAULT_DAYS, team: str | None = None) -> Report:
    """What the console and the API show (admins and auditors): the counts brought up to
    date, then the window's rows and totals."""
    actor.require(*READERS, action="inspection.counts", target_type="inspection",
                  target_id="counts")
    since, until = window(days)
    rollup()
    rows = _rows(since, team)
    by_type, by_team = totals(rows)
    return Report(since, until, tuple(rows), by_type, by_team)
