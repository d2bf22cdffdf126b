"""Batches: the list (one's own; admins and auditors all, as the batches service decides),
each one's progress from its lines, cancel, and the input, output and error files."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

from flask import g, request, send_file, url_for
from werkzeug.wrappers import Response

from charter.batches import files
from charter.batches import service as batches
from charter.console.blueprint import bp
from charter.console.ui import action, render

PAGE = 25
CANCELLABLE = ("validating", "in_progress")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


def _moment(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


def _row(batch: dict[str, Any]) -> dict[str, Any]:
    counts = batch["request_counts"]
    done = counts["completed"] + counts["failed"]
    return {**batch, "done": done,
            "percent": round(100 * done / counts["total"]) if counts["total"] else 0,
            "created": _moment(batch["created_at"]),
            "ended": _moment(batch["completed_at"] or batch["failed_at"]
                             or batch["cancelled_at"] or batch["expired_at"])}


@bp.get("/batches", endpoint="batches")
def batches_page() -> Response:
    after = request.args.get("after") or None
    found, more = batches.list_batches(g.actor, limit=PAGE, after=after)
    rows = [_row(b) for b in found]
    return render("console/pages/batches.html", section="batches", title="Batches", rows=rows,
                  more=more, after=after, next_after=rows[-1]["id"] if more and rows else None,
                  cancellable=CANCELLABLE,
                  polling=any(r["status"] in ACTIVE for r in rows))


@bp.post("/batches/<batch_id>/cancel")
@action(lambda batch_id: url_for("console.batches"))
def batch_cancel(batch_id: str) -> str:
    batch = batches.cancel_batch(g.actor, batch_id)
    return f"Cancelling {batch['id']}: no line starts after this; it is {batch['status']}."


@bp.get("/batches/files/<file_id>")
def batch_file(file_id: str) -> Response:
    """A file's content as a download, read through the files service (who may see it)."""
    stored, content = files.file_content(g.actor, file_id)
    return send_file(io.BytesIO(content), mimetype="application/octet-stream",
                     as_attachment=True, download_name=stored.filename or stored.id)
