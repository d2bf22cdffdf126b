"""Inspection: findings of inspected requests per UTC day, team and type, with totals by
type and by team (admins and auditors; counts from the audit log, never any text)."""

from __future__ import annotations

from flask import g, request
from werkzeug.wrappers import Response

from charter.console.blueprint import bp
from charter.console.ui import render
from charter.inspection import counts


@bp.get("/inspection", endpoint="inspection")
def inspection_page() -> Response:
    raw = (request.args.get("days") or "").strip() or str(counts.DEFAULT_DAYS)
    try:
        days = int(raw)
    except ValueError:
        days = 0  # not a number: refused as out of range, with the range in the message
    report = counts.report(g.actor, days=days)
    return render("console/pages/inspection.html", section="inspection", title="Inspection",
                  report=report, days=days)
