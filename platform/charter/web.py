"""What every HTTP request goes through, whichever door it comes in by: Flask's routes
(charter.app) or the dispatch routes' own WSGI path (charter.dispatch.wsgi). Its id, its
trace span, its caller, its security headers, its metrics and its log line: one rule each,
kept here so that the two doors cannot drift apart."""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

import structlog
from prometheus_client import Counter, Histogram

from charter.actor import Actor
from charter.context import RequestContext
from charter.errors import ForbiddenError
from charter.identity import authn
from charter.runtime import Runtime
from charter.tracing import set_attributes

log = structlog.get_logger("charter.http")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SCIM_PREFIX = "/scim/v2"  # the identity provider's (charter.identity.scim)
UNTRACED = ("/metrics", "/healthz")  # scraped and probed: no span, no log line
# Set on every answer unless the route set its own (a stream's Cache-Control: no-cache).
DEFAULT_HEADERS = (("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"))


def request_id(incoming: str) -> str:
    """The caller's X-Request-Id when it is a sane one (it ties their logs to ours), else a
    new one."""
    return incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(16)


class ServerSpan:
    """A request's span, begun: `end()` it when the answer is over (a stream's: when its
    last byte is written, or when it is handed to the relay)."""

    __slots__ = ("_cm", "span")

    def __init__(self, cm: Any) -> None:
        self._cm, self.span = cm, cm.__enter__()

    def answered(self, status: int) -> None:
        set_attributes(self.span, **{"http.response.status_code": status})

    def end(self) -> None:
        self._cm.__exit__(None, None, None)


def server_span(runtime: Runtime, method: str, route: str, headers: Any,
                rid: str) -> ServerSpan | None:
    """The request's server span (None when tracing is off); `route` is the route's rule,
    not the path (bounded)."""
    if not runtime.tracing.enabled:
        return None
    return ServerSpan(runtime.tracing.server_span(
        f"{method} {route}", headers, **{"http.request.method": method,
                                         "http.route": route, "charter.request_id": rid}))


def authenticate(runtime: Runtime, ctx: RequestContext, authorization: str, path: str, *,
                 optimistic: bool) -> tuple[Actor | None, RequestContext]:
    """The caller of an API or gateway request (None: no credentials; the operation
    decides) and the context it acts in. A provisioner's credential is SCIM's only."""
    with runtime.tracing.span("charter.authenticate"):
        actor, generation = authn.authenticate_request(ctx, authorization,
                                                       optimistic=optimistic)
    if actor is not None and actor.kind == "provisioner" and not path.startswith(SCIM_PREFIX):
        raise ForbiddenError("this credential is the identity provider's, for SCIM "
                             "(/scim/v2) only", code="scim_credential_only")
    return actor, ctx.with_actor(actor, generation)


class Traffic:
    """The HTTP metrics (in the Runtime's own registry) and the request log line, which is
    INFO: below that level it is not even built."""

    def __init__(self, runtime: Runtime) -> None:
        registry = runtime.metrics
        self.requests = Counter("charter_http_requests_total", "HTTP requests answered",
                                ["method", "endpoint", "status"], registry=registry)
        self.latency = Histogram("charter_http_request_seconds", "HTTP request latency",
                                 ["method", "endpoint"], registry=registry)
        self.log_requests = (getattr(logging, runtime.settings.log_level.upper())
                             <= logging.INFO)

    def answered(self, method: str, path: str, endpoint: str, status: int, elapsed: float,
                 actor: Actor | None, rid: str) -> None:
        method = method if method in _METHODS else "other"  # bounded labels
        self.requests.labels(method, endpoint, status).inc()
        self.latency.labels(method, endpoint).observe(elapsed)
        if self.log_requests and path not in UNTRACED:
            log.info("request", method=method, path=path, status=status,
                     ms=round(elapsed * 1000, 2), actor=actor.ref if actor else None,
                     request_id=rid)
