"""Usage for chargeback: metered requests and tokens per team, API key, model (serving
name) and UTC day, for the teams the caller may see (admins and auditors: every team), as
JSON or CSV. Counted in the audit transaction that admits a request and records its
outcome (charter.metering): the node's own token counts (docs/dispatch.md), and where a
node reported none, Charter's count, said so (`tokens_estimated`)."""

from __future__ import annotations

import calendar
import csv
import io
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from charter.actor import Actor
from charter.db import utcnow
from charter.errors import NotFoundError, ValidationFailedError
from charter.exports.records import csv_cell
from charter.identity import teams
from charter.metering import service as metering
from charter.nodes import service as nodes
from charter.registry import service as registry

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
    # The 30 days before `until`, or as many as the calendar has (`until` may be year 1).
    since = since or until - timedelta(days=min(29, (until - date.min).days))
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


CHARGEBACK_COLUMNS = ("month", "team", "model", "version", "requests", "tokens_in",
                      "tokens_out", "tokens_estimated", "currency", "cost")
CENT = Decimal("0.0001")  # costs to a hundredth of a cent; lines are rounded, then summed


def chargeback_report(actor: Actor, *, month: str | None) -> dict[str, Any]:
    """One UTC month per team the caller may see: what each model's use cost at its
    version's price (`PUT /api/v1/prices/{version_id}`, per million tokens in and out),
    each line rounded half up to 0.0001 and the team's total the sum of its lines (as an
    invoice adds up); use of a version with no price is listed, and counted as
    `unpriced_tokens`, never priced at zero. Amounts are decimal strings."""
    first, last = _month(month or utcnow().strftime("%Y-%m"))
    visible = {t.id: t.name for t in teams.list_teams(actor)}
    version_of = {d.serving_name: d.version_id for d in nodes.list_deployments()}
    refs = registry.version_refs(sorted(set(version_of.values())))
    price_of = metering.prices()
    lines: dict[tuple[str, str], list[int]] = {}
    for r in metering.usage_since(list(visible), first):
        if r.day <= last:
            acc = lines.setdefault((visible[r.team_id], r.serving_name), [0, 0, 0, 0])
            for i, v in enumerate((r.requests, r.tokens_in, r.tokens_out, r.tokens_estimated)):
                acc[i] += v
    by_team: dict[str, dict[str, Any]] = {}
    for (team, model), (requests, tokens_in, tokens_out, estimated) in sorted(lines.items()):
        version_id = version_of.get(model)
        ref = refs.get(version_id) if version_id else None
        price = price_of.get(version_id) if version_id else None
        cost = None if price is None else (
            (tokens_in * price.input_per_million + tokens_out * price.output_per_million)
            / 1_000_000).quantize(CENT, ROUND_HALF_UP)
        line = {"model": model, "version": f"{ref.model_name} {ref.label}" if ref else None,
                "version_id": version_id, "requests": requests, "tokens_in": tokens_in,
                "tokens_out": tokens_out, "tokens_estimated": estimated,
                "currency": price.currency if price else None,
                "cost": None if cost is None else str(cost),
                "price": None if price is None else {
                    "input_per_million": format(price.input_per_million.normalize(), "f"),
                    "output_per_million": format(price.output_per_million.normalize(), "f")}}
        entry = by_team.setdefault(team, {"team": team, "requests": 0, "tokens_in": 0,
                                          "tokens_out": 0, "tokens_estimated": 0,
                                          "unpriced_tokens": 0, "cost": {}, "lines": []})
        entry["lines"].append(line)
        for key in ("requests", "tokens_in", "tokens_out", "tokens_estimated"):
            entry[key] += line[key]
        if cost is None:
            entry["unpriced_tokens"] += tokens_in + tokens_out
        else:
            assert price is not None
            entry["cost"][price.currency] = entry["cost"].get(price.currency, Decimal(0)) + cost
    totals: dict[str, Any] = {"requests": 0, "tokens_in": 0, "tokens_out": 0,
                              "tokens_estimated": 0, "unpriced_tokens": 0, "cost": {}}
    for entry in by_team.values():
        for key in ("requests", "tokens_in", "tokens_out", "tokens_estimated",
                    "unpriced_tokens"):
            totals[key] += entry[key]
        for currency, amount in entry["cost"].items():
            totals["cost"][currency] = totals["cost"].get(currency, Decimal(0)) + amount
        entry["cost"] = {c: str(a) for c, a in sorted(entry["cost"].items())}
    totals["cost"] = {c: str(a) for c, a in sorted(totals["cost"].items())}
    return {"month": first.strftime("%Y-%m"), "teams": list(by_team.values()),
            "totals": totals}


def _month(text: str) -> tuple[date, date]:
    """The first and the last day of a `YYYY-MM` month (9999-12 included: no day after it
    is computed)."""
    try:
        year, month = (int(x) for x in text.split("-"))
        first = date(year, month, 1)
    except ValueError:
        raise ValidationFailedError("month must be YYYY-MM", details={"errors": [
            {"field": "month", "code": "format", "message": text[:20]}]}) from None
    return first, date(year, month, calendar.monthrange(year, month)[1])


def chargeback_csv(report: dict[str, Any]) -> str:
    """One line a team and model; every cell quoted and defused."""
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    writer.writerow(CHARGEBACK_COLUMNS)
    for team in report["teams"]:
        for line in team["lines"]:
            row = {**line, "month": report["month"], "team": team["team"]}
            writer.writerow([csv_cell(row[c]) for c in CHARGEBACK_COLUMNS])
    return buf.getvalue()
