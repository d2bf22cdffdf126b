"""Inspection: findings of inspected requests per UTC day, team and type, with totals by
type and by team (admins and auditors; counts from the audit log, never any text), and the
investigation captures with their approval, window and retention: admins ask for one,
an auditor who did not ask approves or rejects it, either ends a running one. Records
are read through the API only (GET /api/v1/captures/{id}/records), each read audited."""

from __future__ import annotations

from flask import g, request, url_for
from werkzeug.wrappers import Response

from charter import scope
from charter.console.blueprint import bp
from charter.console.ui import action, render
from charter.identity import teams
from charter.inspection import captures, counts
from charter.inspection.captures_api import CaptureCreate, out


@bp.get("/inspection", endpoint="inspection")
def inspection_page() -> Response:
    raw = (request.args.get("days") or "").strip() or str(counts.DEFAULT_DAYS)
    try:
        days = int(raw)
    except ValueError:
        days = 0  # not a number: refused as out of range, with the range in the message
    report = counts.report(g.actor, days=days)
    found = out(captures.list_captures(g.actor))
    names = {t.id: t.name for t in teams.list_teams(g.actor)}
    return render("console/pages/inspection.html", section="inspection", title="Inspection",
                  report=report, days=days, captures=found, team_names=names,
                  settings=scope.current().settings, my_ref=g.actor.ref)


def _back(**_: str) -> str:
    return url_for("console.inspection") + "#captures"


def _int(name: str) -> int:
    raw = request.form.get(name, "")
    return int(raw) if raw.isdigit() else -1


@bp.post("/inspection/captures")
@action(_back)
def ask_capture() -> str:
    body = CaptureCreate.model_validate({
        "team_id": request.form.get("team_id", ""), "reason": request.form.get("reason", ""),
        "hours": _int("hours"), "retain_days": _int("retain_days")}, strict=False)
    row = captures.request_capture(g.actor, team_id=body.team_id, reason=body.reason,
                                   hours=body.hours, retain_days=body.retain_days)
    return f"Capture asked for; an auditor other than you decides on it ({row.id})."


@bp.post("/inspection/captures/<capture_id>/<any(approve, reject, revoke):verb>")
@action(_back)
def decide_capture(capture_id: str, verb: str) -> str:
    note, row_version = request.form.get("note", ""), _int("row_version")
    if verb == "revoke":
        captures.revoke_capture(g.actor, capture_id, note=note, row_version=row_version)
        return "Capture ended: nothing more is recorded; its records stay until the purge."
    row = captures.decide_capture(g.actor, capture_id, approve=verb == "approve", note=note,
                                  row_version=row_version)
    return (f"Capture approved: recording until {row.ends_at:%Y-%m-%d %H:%M} UTC."
            if row.state == "approved" else "Capture rejected.")
