"""The caller-facing protocol plumbing shared by the gateway and the files and batches API:
OpenAI's and TGI's error shapes, the request's labels, the recording of malformed
requests of a known caller (view layer; no writes in error handlers), and the exchange
and answer of the dispatch routes' own WSGI path (charter.dispatch.wsgi)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any

from flask import Response, g, request
from werkzeug.datastructures import EnvironHeaders
from werkzeug.http import HTTP_STATUS_CODES

from charter.actor import Actor
from charter.context import RequestContext
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


_ERROR_KINDS = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error"}


def error_payload(protocol: str, status: int, code: str, message: str) -> bytes:
    """The error body an OpenAI (`protocol` "openai") or a TGI client reads."""
    return json.dumps(upstream.error_body(protocol, message, code=code,
                                          kind=_ERROR_KINDS.get(status, "api_error"))).encode()


def error_headers(exc: CharterError) -> dict[str, str]:
    """What an error tells a client to do, whatever its shape: when to come back
    (`Retry-After`, where the error says) and how to authenticate (401)."""
    headers = {}
    if "retry_after_s" in exc.details:
        headers["Retry-After"] = str(exc.details["retry_after_s"])
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="charter"'
    return headers


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> Response:
    response = Response(error_payload(caller_protocol(), status, code, message),
                        status=status, mimetype="application/json")
    response.headers["X-Request-Id"] = g.get("request_id", "")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def render_error(exc: CharterError) -> Response:
    return error_response(exc.status, exc.code, exc.message, error_headers(exc))


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
            raise refusal(g.get("actor"), kwargs.get("name") or g.get("asked_model"),
                          exc) from None

    return recorded


def refusal(actor: Actor | None, name: object, exc: DispatchError) -> CharterError:
    """What a refused request raises: a malformed request of a known caller recorded first
    (as a refusal of the deployment it named, `name`), or the error itself."""
    if not exc.malformed or actor is None:
        return exc
    named = str(name or "-")
    if not named.isprintable() or len(named) > 200:
        named = "-"  # a name no deployment could have (invalid_model_name says so)
    return service.record_refusal(actor, named, exc)


def malformed_for(protocol: str, message: str, code: str = "invalid_request") -> DispatchError:
    """A request its protocol's clients would not send: 400 for OpenAI's, 422 for TGI's
    (TGI's own validation status)."""
    return DispatchError(message, code=code, status=422 if protocol == "tgi" else 400,
                         malformed=True)


def malformed(message: str, code: str = "invalid_request") -> DispatchError:
    return malformed_for(caller_protocol(), message, code)


def required(actor: Actor | None) -> Actor:
    if actor is None:
        raise UnauthenticatedError("authentication required: send `Authorization: Bearer "
                                   "<API key or token>`", code="unauthenticated")
    return actor


def caller() -> Actor:
    return required(g.get("actor"))


def labels_of(headers: Any, protocol: str) -> tuple[str | None, str | None]:
    """The request's data class and purpose (`X-Charter-Data-Class`, `X-Charter-Purpose`),
    canonical, or None where it sent none."""
    labels = []
    for name in (DATA_CLASS_HEADER, PURPOSE_HEADER):
        value = headers.get(name) or None
        found = canonical(value) if value is not None else None
        if value is not None and (found is None or len(found) > 50):
            raise malformed_for(protocol, f"{name} must be an identifier (ASCII letters, "
                                "digits, '.', '_', '+' or '-', a letter or digit first, at "
                                "most 50 characters)")
        labels.append(found)
    return labels[0], labels[1]


def request_labels() -> tuple[str | None, str | None]:
    return labels_of(request.headers, caller_protocol())


# --- the dispatch routes' own WSGI path (charter.dispatch.wsgi) ----------------------------

class Exchange:
    """One request on a dispatch route, answered without Flask: what its handler reads
    of the request, and what the door learned of its caller."""

    __slots__ = ("environ", "headers", "protocol", "request_id", "ctx", "actor",
                 "asked_model", "max_body")

    def __init__(self, environ: dict[str, Any], protocol: str, request_id: str,
                 ctx: RequestContext, max_body: int) -> None:
        self.environ, self.headers = environ, EnvironHeaders(environ)
        self.protocol, self.request_id, self.ctx = protocol, request_id, ctx
        self.actor: Actor | None = None
        self.asked_model: str | None = None  # the body's `model`, for a refusal's record
        self.max_body = max_body

    def caller(self) -> Actor:
        return required(self.actor)

    def malformed(self, message: str, code: str = "invalid_request") -> DispatchError:
        return malformed_for(self.protocol, message, code)

    def labels(self) -> tuple[str | None, str | None]:
        return labels_of(self.headers, self.protocol)

    def body(self) -> bytes:
        """The request's body, at most `max_body` bytes (413 past it, before reading more
        than that): by its Content-Length, or to its end where the server ended it (a
        chunked body), else none."""
        environ, limit = self.environ, self.max_body
        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH")
        if length:
            size = int(length) if length.isdigit() else -1
            if size < 0:
                raise self.malformed("the Content-Length header is not a number of bytes",
                                     "invalid_content_length")
            if size > limit:
                raise self._too_large()
            data: bytes = stream.read(size)
            if len(data) < size:
                raise self.malformed("the body ended before its Content-Length",
                                     "incomplete_body")
            return data
        if environ.get("wsgi.input_terminated"):
            data = stream.read(limit + 1)
            if len(data) > limit:
                raise self._too_large()
            return data
        return b""

    def _too_large(self) -> DispatchError:
        """413, refused like any request that cannot be read (recorded for a known caller)."""
        return DispatchError(f"the body is larger than {self.max_body} bytes",
                             code="payload_too_large", status=413,
                             details={"max_body_bytes": self.max_body}, malformed=True)


class Answer:
    """A dispatch route's answer: its status, headers and body (bytes, or an iterable of
    them for a stream)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, body: bytes | Iterable[bytes], content_type: str,
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.body = status, body
        self.headers = {"Content-Type": content_type, **(headers or {})}

    @classmethod
    def error(cls, protocol: str, exc: CharterError) -> Answer:
        return cls(exc.status, error_payload(protocol, exc.status, exc.code, exc.message),
                   "application/json", error_headers(exc))

    def status_line(self) -> str:
        return f"{self.status} {HTTP_STATUS_CODES.get(self.status, 'Unknown')}"
