"""Usage for chargeback: metered requests and tokens per team, API key, model (serving
name) and UTC day, for the teams the caller may see (admins and auditors: every team), as
JSON or CSV. Counted in the audit transaction that admits a request and records its
outcome (charter.metering): the node's own token counts (docs/dispatch.md), and where a
node reported none, Charter's count, said so (`tokens_estimated`)."""

from __future__ import annotations

import csv
import io
from datetime import date, timedelta
from typing import Any

from charter.actor import Actor
from charter.db import utcnow
from charter.errors import NotFoundError, ValidationFailedError
from charter.exports.records import csv_cell
from charter.identity import teams
from charter.metering import service as metering

MAX_DAYS = 366
COLUMNS = ("team", "key", "model", "day", "requests", "tokens_in", "tokens_out",
           "tokens_estimated")
SUMMED = ("requests", "tokens_in", "tokens_out", "tokens_estimated")


def usage_report(actor: Actor, *, since: date | None, until: date | None,
                 team: str | None, model: str | None, key: str | None = None
                 ) -> dict[str, Any]:
    """Rows per team, key (null: a token from the identity provider), model and day;
    `tokens_estimated` of a row is the part of its tokens the node did not report."""
    until = until or utcnow().date()
    since = since or until - timedelta(days=29)
    if since > until or (until - since).days >= MAX_DAYS:
        raise ValidationFailedError(
            f"the period must run forwards and span at most {MAX_DAYS} days",
            details={"errors": [{"field": "since", "code": "period",
                                 "message": f"{since} to {until}"}]})
    visible = {t.id: t.name for t in teams.list_teams(actor)}
    if team is not None:
        visible = {i: n for i, n in visible.items() if n == team}
        if not visible:  # another team's name is not told apart from no team at all
            raise NotFoundError(f"no team {team!r}", code="team_not_found")
    rows: list[dict[str, Any]] = [
        {"team": visible[r.team_id], "key": r.key_id or None, "model": r.serving_name,
         "day": r.day.isoformat(), "requests": r.requests, "tokens_in": r.tokens_in,
         "tokens_out": r.tokens_out, "tokens_estimated": r.tokens_estimated}
        for r in metering.usage_since(list(visible), since)
        if r.day <= until and (model is None or r.serving_name == model)
        and (key is None or r.key_id == key)]
    rows.sort(key=lambda r: (r["day"], r["team"], r["key"] or "", r["model"]))
    totals = {k: sum(r[k] for r in rows) for k in SUMMED}
    return {"since": since.isoformat(), "until": until.isoformat(), "rows": rows,
            "totals": totals}


def as_csv(report: dict[str, Any]) -> str:
    """RFC 4180, every cell quoted and defused (a model named `=cmd` stays text)."""
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for row in report["rows"]:
        writer.writerow([csv_cell(row[c]) for c in COLUMNS])
    return buf.getvalue()
