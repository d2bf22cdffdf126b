"""OpenAI's files and batches endpoints (the `openai` client's files.* and batches.*).

Errors use OpenAI's error shape, as on the gateway's other `/v1/` routes.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from charter import scope
from charter.batches import files, service
from charter.dispatch.protocol import (
    DATA_CLASS_HEADER,
    PURPOSE_HEADER,
    caller,
    error_response,
    records_malformed,
    render_error,
    request_labels,
)
from charter.errors import CharterError
from charter.uow import refuse

bp = Blueprint("batches", __name__)
bp.register_error_handler(CharterError, render_error)


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


@bp.errorhandler(413)
def _too_large(_exc: Exception) -> Response:
    limit = request.max_content_length
    return error_response(413, "payload_too_large", f"the body is larger than {limit} bytes")


def _limit(default: int, top: int) -> int:
    raw = request.args.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= top:
        raise files.BatchRequestError(f"`limit` must be an integer from 1 to {top}",
                                        code="invalid_limit")
    return int(raw)


# --- files ----------------------------------------------------------------------------------

@bp.post("/v1/files")
def upload_file() -> Response:
    actor = caller()
    settings = scope.current().settings
    request.max_content_length = settings.files_max_bytes + 65_536  # the form around it
    too_large = files.BatchRequestError(
        f"the file is larger than {settings.files_max_bytes} bytes", code="payload_too_large",
        status=413, details={"limit_bytes": settings.files_max_bytes})
    try:
        upload = request.files.get("file")
    except RequestEntityTooLarge:
        refuse(too_large.audited(actor.ref, "file.upload", "file", "-"))
    if upload is None:
        raise files.BatchRequestError("send the file as multipart form field `file`",
                                        code="missing_file")
    content = upload.read(settings.files_max_bytes + 1)
    if len(content) > settings.files_max_bytes:
        name = (upload.filename or "").replace("\\", "/").rsplit("/", 1)[-1]
        refuse(too_large.audited(actor.ref, "file.upload", "file", name[:200] or "-"))
    stored = files.upload_file(actor, settings, filename=upload.filename or "",
                                 purpose=request.form.get("purpose", ""), content=content)
    return _json(files.file_view(stored))


@bp.get("/v1/files")
def list_files() -> Response:
    found = files.list_files(caller(), purpose=request.args.get("purpose") or None,
                             limit=_limit(100, 10_000), after=request.args.get("after"))
    data = [files.file_view(f) for f in found]
    return _json({"object": "list", "data": data, "has_more": False,
                  "first_id": data[0]["id"] if data else None,
                  "last_id": data[-1]["id"] if data else None})


@bp.get("/v1/files/<file_id>")
def get_file(file_id: str) -> Response:
    return _json(files.file_view(files.get_file(caller(), file_id)))


@bp.get("/v1/files/<file_id>/content")
def file_content(file_id: str) -> Response:
    stored, content = files.file_content(caller(), file_id)
    out = Response(content, mimetype="application/octet-stream")
    out.headers["Content-Disposition"] = f'attachment; filename="{stored.filename}"'
    return out


@bp.delete("/v1/files/<file_id>")
def delete_file(file_id: str) -> Response:
    stored = files.delete_file(caller(), file_id)
    return _json({"id": stored.id, "object": "file", "deleted": True})


# --- batches --------------------------------------------------------------------------------

@bp.post("/v1/batches")
@records_malformed
def create_batch() -> Response:
    actor = caller()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise files.BatchRequestError("the body must be a JSON object", code="invalid_json")
    data_class, purpose = request_labels()
    batch = service.create_batch(
        actor, input_file_id=body.get("input_file_id"), endpoint=body.get("endpoint"),
        completion_window=body.get("completion_window"), metadata=body.get("metadata"),
        data_class=data_class, purpose=purpose)
    return _json(service.get_batch(actor, batch.id))


@bp.get("/v1/batches")
def list_batches() -> Response:
    data, more = service.list_batches(caller(), limit=_limit(20, 100),
                                      after=request.args.get("after"))
    return _json({"object": "list", "data": data, "has_more": more,
                  "first_id": data[0]["id"] if data else None,
                  "last_id": data[-1]["id"] if data else None})


@bp.get("/v1/batches/<batch_id>")
def get_batch(batch_id: str) -> Response:
    return _json(service.get_batch(caller(), batch_id))


@bp.post("/v1/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str) -> Response:
    return _json(service.cancel_batch(caller(), batch_id))


__all__ = ["DATA_CLASS_HEADER", "PURPOSE_HEADER", "bp"]
