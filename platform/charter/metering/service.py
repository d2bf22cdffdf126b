"""Metering reads and writes: what teams used, and the counters the group commit adds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from sqlalchemy import func, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from charter.db import utcnow
from charter.metering.models import Usage
from charter.uow import unit_of_work


@dataclass(frozen=True, slots=True)
class UsageDelta:
    """Counters to add for one team, key, serving name and day."""

    team_id: str
    serving_name: str
    day: date
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    key_id: str = ""  # the API key used; "" for a token from the identity provider
    tokens_estimated: int = 0  # of tokens_in + tokens_out, those the node did not report


@dataclass(frozen=True, slots=True)
class UsageRow:
    team_id: str
    serving_name: str
    day: date
    requests: int
    tokens_in: int
    tokens_out: int
    key_id: str = ""
    tokens_estimated: int = 0


def usage_since(team_ids: Sequence[str], since: date) -> list[UsageRow]:
    """Metered requests and tokens per team, serving name and UTC day, newest first."""
    if not team_ids:
        return []
    with unit_of_work() as session:
        return [UsageRow(u.team_id, u.serving_name, u.day, u.requests, u.tokens_in,
                         u.tokens_out, u.key_id, u.tokens_estimated)
                for u in session.scalars(
                    select(Usage).where(Usage.team_id.in_(team_ids), Usage.day >= since)
                    .order_by(Usage.day.desc(), Usage.serving_name))]


def requests_today(team_ids: Sequence[str]) -> dict[str, int]:
    """Each team's requests so far today (UTC): what its quota is checked against."""
    if not team_ids:
        return {}
    with unit_of_work() as session:
        return requests_on(session.connection(), team_ids, utcnow().date())


def requests_on(conn: Connection, team_ids: Sequence[str], day: date) -> dict[str, int]:
    """The teams' requests on `day`, read on `conn` (the group commit's, under its lock)."""
    if not team_ids:
        return {}
    rows = conn.execute(
        select(Usage.team_id, func.coalesce(func.sum(Usage.requests), 0))
        .where(Usage.day == day, Usage.team_id.in_(list(team_ids)))
        .group_by(Usage.team_id)).all()
    return {team_id: int(n) for team_id, n in rows}


def add_sqlite(conn: Connection, deltas: Sequence[UsageDelta]) -> None:
    """Add counters on SQLite (PostgreSQL adds them in charter_audit_append)."""
    for u in deltas:
        stmt = sqlite_insert(Usage).values(
            team_id=u.team_id, key_id=u.key_id, serving_name=u.serving_name, day=u.day,
            requests=u.requests, tokens_in=u.tokens_in, tokens_out=u.tokens_out,
            tokens_estimated=u.tokens_estimated)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=["team_id", "key_id", "serving_name", "day"],
            set_={"requests": Usage.requests + stmt.excluded.requests,
                  "tokens_in": Usage.tokens_in + stmt.excluded.tokens_in,
                  "tokens_out": Usage.tokens_out + stmt.excluded.tokens_out,
                  "tokens_estimated": Usage.tokens_estimated
                  + stmt.excluded.tokens_estimated}))
