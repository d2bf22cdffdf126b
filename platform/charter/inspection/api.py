"""Inspection's findings by day, team and type under /api/v1/inspection, for admins and
auditors: counts only, never any text."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

from charter.actor import Actor
from charter.apikit import ApiBlueprint
from charter.inspection import counts

bp = ApiBlueprint("inspection", __name__, url_prefix="/api/v1")


class CountsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Bounded by the service (1 to 365), after the role check: a caller without the role
    # gets 403, not a 422 first.
    days: int = counts.DEFAULT_DAYS
    team: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None


class CountOut(BaseModel):
    day: date
    team: str | None
    type: str
    requests: int
    findings: int


class TypeTotalOut(BaseModel):
    type: str
    requests: int
    findings: int


class TeamTotalOut(BaseModel):
    team: str | None
    findings: int


class CountsOut(BaseModel):
    since: date
    until: date
    rows: list[CountOut]
    by_type: list[TypeTotalOut]
    by_team: list[TeamTotalOut]


@bp.operation("GET", "/inspection/counts",
              summary="Findings of inspected requests per UTC day, team and type, with "
              "totals by type and by team (counts only)",
              query=CountsQuery, response=CountsOut, errors=(403, 422))
def inspection_counts(actor: Actor, query: CountsQuery) -> object:
    return counts.report(actor, days=query.days, team=query.team)
