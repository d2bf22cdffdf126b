"""The caller-facing protocol plumbing shared by the gateway and the files and batches API:
OpenAI's and TGI's error shapes, the request's labels, and the recording of malformed
requests of a known caller (view layer; no writes in error handlers)."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Response, g, request

from charter.actor import Actor
from charter.dispatch import service, upstream
from charter.dispatch.service import DispatchError
from charter.errors import CharterError, UnauthenticatedError
from charter.identifiers import canonical

DATA_CLASS_HEADER = "X-Charter-Data-Class"
PURPOSE_HEADER = "X-Charter-Purpose"
MODEL_HEADER = "X-Charter-Model"


# --- error shapes ---------------------------------------------------------------------------

TGI_PATHS = ("/generate", "/generate_stream", "/info", "/tgi/", "/embed", "/tei/")


def caller_protocol() -> str:
    """The protocol of the request being answered (one of the gateway's)."""
    return gateway_protocol(request.path, request.method) or "tgi"


def gateway_protocol(path: str, method: str) -> str | None:
    """The protocol a request to `path` speaks when it is one of the gateway's (an OpenAI
    client's `/v1/...`, a TGI client's routes, `POST /`), else None (Charter's own API)."""
    if path.startswith("/v1/") or path == "/v1":
        return "openai"
    if path.startswith(TGI_PATHS) or (path == "/" and method == "POST"):
        return "tgi"
    return None


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> Response:
    kind = {400: "invalid_request_error", 401: "authentication_error",
            403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
            422: "invalid_request_error", 429: "rate_limit_error"}.get(status, "api_error")
    body = upstream.error_body(caller_protocol(), message, code=code, kind=kind)
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    response.headers["X-Request-Id"] = g.get("request_id", "")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def render_error(exc: CharterError) -> Response:
    headers = {}
    if "retry_after_s" in exc.details:
        headers["Retry-After"] = str(exc.details["retry_after_s"])
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="charter"'
    return error_response(exc.status, exc.code, exc.message, headers)


def records_malformed(view: Callable[..., Response]) -> Callable[..., Response]:
    """A malformed request of a known caller is a refused dispatch like any other: the
    view's parse errors (`DispatchError(malformed=True)`) are recorded here, in the view
    layer, before they leave it. If even that cannot be recorded, the caller hears so
    (audit_unavailable). Error handlers only render."""

    @wraps(view)
    def recorded(**kwargs: Any) -> Response:
        try:
            return view(**kwargs)
        except DispatchError as exc:
            actor = g.get("actor")
            if not exc.malformed or actor is None:
                raise
            name = str(kwargs.get("name") or g.get("asked_model") or "-")
            if not name.isprintable() or len(name) > 200:
                name = "-"  # a name no deployment could have (invalid_model_name says so)
            raise service.record_refusal(actor, name, exc) from None

    return recorded


def malformed(message: str, code: str = "invalid_request") -> DispatchError:
    return DispatchError(message, code=code, status=422 if caller_protocol() == "tgi" else 400,
                         malformed=True)


def caller() -> Actor:
    actor: Actor | None = g.get("actor")
    if actor is None:
        raise UnauthenticatedError("authentication required: send `Authorization: Bearer "
                                   "<API key or token>`", code="unauthenticated")
    return actor


def request_labels() -> tuple[str | None, str | None]:
    data_class = request.headers.get(DATA_CLASS_HEADER) or None
    purpose = request.headers.get(PURPOSE_HEADER) or None
    labels = []
    for name, value in ((DATA_CLASS_HEADER, data_class), (PURPOSE_HEADER, purpose)):
        found = canonical(value) if value is not None else None
        if value is not None and (found is None or len(found) > 50):
            raise malformed(f"{name} must be an identifier (ASCII letters, digits, '.', '_', "
                            "'+' or '-', a letter or digit first, at most 50 characters)")
        labels.append(found)
    return labels[0], labels[1]
