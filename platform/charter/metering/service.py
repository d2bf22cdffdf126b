"""Metering reads and writes: what teams used, and the counters the group commit adds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from charter.db import utcnow
from charter.metering.models import Price, Usage
from charter.uow import record, unit_of_work


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


@dataclass(frozen=True, slots=True)
class PriceRow:
    version_id: str
    currency: str
    input_per_million: Decimal
    output_per_million: Decimal
    updated_at: datetime
    updated_by: str


def set_price(actor_ref: str, version_id: str, *, currency: str, input_per_million: Decimal,
              output_per_million: Decimal) -> PriceRow:
    """Set (or replace) a version's price, recorded as `price.set` with what it was."""
    with unit_of_work() as session:
        price = session.get(Price, version_id)
        before = None if price is None else {
            "currency": price.currency, "input_per_million": str(price.input_per_million),
            "output_per_million": str(price.output_per_million)}
        if price is None:
            price = Price(version_id=version_id)
            session.add(price)
        price.currency, price.updated_at, price.updated_by = currency, utcnow(), actor_ref
        price.input_per_million, price.output_per_million = input_per_million, output_per_million
        session.flush()
        record(session, actor=actor_ref, action="price.set", target_type="model_version",
               target_id=version_id, details={
                   "before": before, "after": {"currency": currency,
                                               "input_per_million": str(input_per_million),
                                               "output_per_million": str(output_per_million)}})
        return _price_row(price)


def prices() -> dict[str, PriceRow]:
    with unit_of_work() as session:
        return {p.version_id: _price_row(p) for p in session.scalars(select(Price))}


def _price_row(p: Price) -> PriceRow:
    return PriceRow(p.version_id, p.currency, Decimal(p.input_per_million),
                    Decimal(p.output_per_million), p.updated_at, p.updated_by)
