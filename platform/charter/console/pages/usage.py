"""Usage: what each team used in a month, and what it cost at the models' prices (the
chargeback report; the teams one may see, like GET /api/v1/chargeback)."""

from __future__ import annotations

from flask import g, request
from werkzeug.wrappers import Response

from charter.console.blueprint import bp
from charter.console.ui import render
from charter.db import utcnow
from charter.errors import ValidationFailedError
from charter.exports import usage


@bp.get("/usage")
def usage_page() -> Response:
    month = (request.args.get("month") or "").strip() or utcnow().strftime("%Y-%m")
    errors: list[str] = []
    try:
        report = usage.chargeback_report(g.actor, month=month)
    except ValidationFailedError as exc:
        errors.append(exc.message)
        report = usage.chargeback_report(g.actor, month=None)
    chart = {t["team"]: {"tokens_in": t["tokens_in"], "tokens_out": t["tokens_out"],
                         "total": t["tokens_in"] + t["tokens_out"]}
             for t in report["teams"]}
    return render("console/pages/usage.html", section="usage", title="Usage",
                  report=report, chart=chart, errors=errors)
