"""The dispatch routes' own WSGI path, in front of Flask.

A gateway request is the one Charter serves most, and Flask's per-request machinery (its
request and application contexts, two URL adapters, routing, the hooks' dispatch, the
response object) was a quarter of its CPU in-process. The dispatch routes (every POST of
charter.dispatch.gateway) are answered here instead: routed by a dictionary, their
handlers given an `Exchange` (charter.dispatch.protocol) rather than Flask's `request`
and `g`. Any other request, and any POST to another path, goes on to Flask unchanged.

What a request goes through here is what Flask's hooks do for the rest, by the same rules
(charter.web): its id, its scope, its span, its caller, the default headers, the metrics
and the log line. The caller is authenticated on the newest generation this process
knows, without a database read: every route here decides through dispatch.admit(), which
commits only if that generation is still current (charter.readcache). A malformed request
of a known caller is recorded as a refusal (charter.dispatch.protocol.refusal); every error
is answered in the caller's protocol's shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from charter import scope, web
from charter.context import RequestContext
from charter.dispatch import gateway
from charter.dispatch.protocol import Answer, Exchange, refusal
from charter.dispatch.service import DispatchError
from charter.errors import CharterError
from charter.runtime import Runtime

log = structlog.get_logger("charter.http")
WSGIApp = Callable[[dict[str, Any], Any], Iterable[bytes]]
Handler = Callable[[Exchange, "str | None"], Answer]


@dataclass(frozen=True, slots=True)
class Route:
    endpoint: str  # the metrics' label (the name Flask gave it when it routed these)
    rule: str  # the span's http.route: bounded, whatever the path's name
    handler: Handler
    protocol: str = "tgi"  # whose error shape its callers read: "openai" or "tgi" (TEI's too)


_EXACT: dict[str, Route] = {route.rule: route for route in (
    Route("gateway.chat_completions", "/v1/chat/completions", gateway.chat_completions,
          "openai"),
    Route("gateway.completions", "/v1/completions", gateway.completions, "openai"),
    Route("gateway.embeddings", "/v1/embeddings", gateway.embeddings, "openai"),
    Route("gateway.generate", "/generate", gateway.generate),
    Route("gateway.generate_stream", "/generate_stream", gateway.generate_stream),
    Route("gateway.embed", "/embed", gateway.embed),
    Route("gateway.compat", "/", gateway.compat),
)}
# /tgi/<name>/<rest> and /tei/<name>/<rest>, by (prefix, rest); None: no rest, no slash.
_NAMED: dict[tuple[str, str | None], Route] = {
    ("tgi", "generate"): Route("gateway.generate", "/tgi/<name>/generate", gateway.generate),
    ("tgi", "generate_stream"): Route("gateway.generate_stream", "/tgi/<name>/generate_stream",
                                      gateway.generate_stream),
    ("tei", "embed"): Route("gateway.embed", "/tei/<name>/embed", gateway.embed),
    ("tgi", ""): Route("gateway.compat", "/tgi/<name>/", gateway.compat),
    ("tgi", None): Route("gateway.compat", "/tgi/<name>", gateway.compat),
    ("tei", ""): Route("gateway.compat", "/tei/<name>/", gateway.compat),
    ("tei", None): Route("gateway.compat", "/tei/<name>", gateway.compat),
}
PATHS = tuple(_EXACT) + tuple(route.rule for route in _NAMED.values())


def match(path: str) -> tuple[Route, str | None] | None:
    """The dispatch route of `path` and the serving name in it, or None (Flask's)."""
    route = _EXACT.get(path)
    if route is not None:
        return route, None
    if not path.startswith(("/tgi/", "/tei/")):
        return None
    parts = path[1:].split("/")
    if len(parts) > 3 or not parts[1]:
        return None
    found = _NAMED.get((parts[0], parts[2] if len(parts) == 3 else None))
    return None if found is None else (found, parts[1])


class DispatchRoutes:
    """WSGI: the dispatch routes answered here, the rest by `app` (Flask's)."""

    def __init__(self, app: WSGIApp, runtime: Runtime, traffic: web.Traffic,
                 max_body: int) -> None:
        self.app, self.runtime, self.traffic, self.max_body = app, runtime, traffic, max_body

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        found = match(path)
        if found is None:
            return self.app(environ, start_response)
        route, name = found
        rt, started = self.runtime, time.perf_counter()
        rid = web.request_id(environ.get("HTTP_X_REQUEST_ID", ""))
        token: Any = scope.bind(rt, request_id=rid)
        ex = Exchange(environ, route.protocol, rid,
                      RequestContext(request_id=rid, client=environ.get("REMOTE_ADDR")
                                     or "unknown"), self.max_body)
        method = environ.get("REQUEST_METHOD", "")
        span = web.server_span(rt, method, route.rule, ex.headers, rid)
        try:
            if method == "POST":
                answer, endpoint = self._handle(ex, route, name, path), route.endpoint
            else:  # what Flask said of a route's other methods
                answer, endpoint = Answer.error(route.protocol, CharterError(
                    "The method is not allowed for the requested URL.",
                    code="method_not_allowed", status=405)), "unmatched"
                answer.headers["Allow"] = "POST"
            headers = answer.headers
            headers["X-Request-Id"] = rid
            for header, value in web.DEFAULT_HEADERS:
                headers.setdefault(header, value)
            if span is not None:
                span.answered(answer.status)
            self.traffic.answered(method, path, endpoint, answer.status,
                                  time.perf_counter() - started, ex.actor, rid)
            body = answer.body
            if isinstance(body, bytes):
                headers["Content-Length"] = str(len(body))
                start_response(answer.status_line(), list(headers.items()))
                return [body]
            start_response(answer.status_line(), list(headers.items()))
            streamed = _Streamed(body, span, token)
            span = token = None  # the stream's now: ended when it is closed
            return streamed
        finally:
            if span is not None:
                span.end()
            if token is not None:
                scope.unbind(token)

    def _handle(self, ex: Exchange, route: Route, name: str | None, path: str) -> Answer:
        try:
            try:
                ex.actor, ex.ctx = web.authenticate(
                    self.runtime, ex.ctx, ex.headers.get("Authorization", ""), path,
                    optimistic=True)
                return route.handler(ex, name)
            except DispatchError as exc:
                raise refusal(ex.actor, name or ex.asked_model, exc) from None
        except CharterError as exc:
            return Answer.error(ex.protocol, exc)
        except Exception as exc:  # noqa: BLE001 - the caller hears 500, the log says why
            log.exception("unhandled error", error=repr(exc))
            return Answer.error(ex.protocol, CharterError(
                "an unexpected error occurred", code="internal_error", status=500))


class _Streamed:
    """A streamed answer's body: the request's span and scope last until the server closes
    it (its last byte written, the caller gone, or the stream handed to the relay)."""

    def __init__(self, body: Iterable[bytes], span: web.ServerSpan | None, token: Any) -> None:
        self._body, self._span, self._token = body, span, token

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            if self._span is not None:
                self._span.end()
                self._span = None
            if self._token is not None:
                scope.unbind(self._token)
                self._token = None
