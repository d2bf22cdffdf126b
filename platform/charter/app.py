"""create_app(runtime): the one Flask application factory."""

from __future__ import annotations

import os
import time
from typing import Any

import structlog
from flask import Flask, Response, g, jsonify, request
from flask.sessions import SecureCookieSessionInterface
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import text
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from charter import __version__, scope, web
from charter.apikit import ApiBlueprint, openapi_document
from charter.audit.api import bp as audit_bp
from charter.batches.api import bp as batches_bp
from charter.console import register_console
from charter.context import RequestContext
from charter.dispatch.gateway import bp as gateway_bp
from charter.dispatch.protocol import (
    error_headers,
    error_response,
    gateway_protocol,
    render_error,
)
from charter.dispatch.wsgi import DispatchRoutes
from charter.errors import CharterError, SchemaOutdatedError
from charter.exports.api import bp as exports_bp
from charter.identity import scim
from charter.identity.api import bp as identity_bp
from charter.inspection.api import bp as inspection_bp
from charter.inspection.captures_api import bp as captures_bp
from charter.logs import configure_logging
from charter.metrics import StateCollector
from charter.migrate import schema_status
from charter.nodes.api import bp as nodes_bp
from charter.policy.api import bp as policy_bp
from charter.registry.api import bp as registry_bp
from charter.runtime import Runtime

log = structlog.get_logger("charter.http")
_HTTP_CODES = {
    400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
    429: "rate_limited",
}
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/api/v1/openapi.json",
                          "/api/v1/audit/keys"})


class _ConsoleSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie session, for the console's pages only (their flashed notices;
    sign-in lives in identity.sessions, server-side). The API and the gateway are stateless:
    their requests open no session (a signer and a cookie parse on every gateway request)."""

    def open_session(self, app: Flask, request: Any) -> Any:
        if not request.path.startswith("/console"):
            return self.make_null_session(app)
        return super().open_session(app, request)


def create_app(runtime: Runtime) -> Flask:
    """The API, the gateway and the console over `runtime`, which each request binds
    (charter.scope). The app keeps no state of its own beyond Flask's configuration."""
    settings = runtime.settings
    settings.require_secret()
    configure_logging(settings)
    if settings.schema_check:
        status = schema_status(runtime.database.engine)
        if not status.current:
            raise SchemaOutdatedError(status.message, details=status.as_dict())

    app = Flask("charter")
    app.session_interface = _ConsoleSessions()
    app.config.update(
        SECRET_KEY=settings.effective_secret_key,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        JSON_SORT_KEYS=False,
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )
    traffic = web.Traffic(runtime)
    # The dispatch routes answer by their own path, past Flask's per-request machinery
    # (charter.dispatch.wsgi); behind the proxy fix, so they see the client as it does.
    app.wsgi_app = DispatchRoutes(  # type: ignore[method-assign]
        app.wsgi_app, runtime, traffic, settings.max_body_bytes)
    if settings.trusted_proxy_hops > 0:
        # The client address (limits, audit) and scheme (secure cookies, URLs) as the
        # trusted proxies saw them; any hop further left is the client's to forge.
        hops = settings.trusted_proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    app.extensions["charter.runtime"] = runtime
    app.extensions["charter.settings"] = settings
    app.extensions["charter.auth_limiter"] = runtime.authenticator.limiter
    try:
        runtime.metrics.register(StateCollector(runtime))
    except ValueError:
        pass  # this runtime's registry has it already (another app on the same runtime)

    _install_request_hooks(app, runtime, traffic)
    _install_error_handlers(app)
    _install_probes(app, runtime)

    for bp in (registry_bp, identity_bp, audit_bp, policy_bp, nodes_bp, gateway_bp,
               batches_bp, exports_bp, captures_bp, inspection_bp, scim.bp):
        app.register_blueprint(bp)
    register_console(app, settings)
    api = [bp for bp in app.blueprints.values() if isinstance(bp, ApiBlueprint)]

    @app.get("/api/v1/openapi.json")
    def openapi() -> Response:
        return jsonify(openapi_document(api, "Charter API", __version__))

    return app


def _install_request_hooks(app: Flask, runtime: Runtime, traffic: web.Traffic) -> None:
    # Each hook takes the request and `g` out of their context proxies once: a gateway
    # request went through werkzeug's LocalProxy about 35 times in these hooks alone.
    @app.before_request
    def _start() -> None:
        req, gg = request._get_current_object(), g._get_current_object()  # type: ignore[attr-defined]
        headers, path = req.headers, req.path
        rid = gg.request_id = web.request_id(headers.get("X-Request-Id", ""))
        gg.scope_token = scope.bind(runtime, request_id=rid)
        gg.started = time.perf_counter()
        gg.actor = None
        ctx = gg.ctx = RequestContext(request_id=rid, client=req.remote_addr or "unknown")
        if path not in web.UNTRACED:
            route = req.url_rule.rule if req.url_rule else "unmatched"  # bounded
            gg.span = web.server_span(runtime, req.method, route, headers, rid)
        if path not in PUBLIC_PATHS and not path.startswith(("/console", "/static")):
            # The API and the gateway; the console has its own sessions.
            gg.actor, gg.ctx = web.authenticate(
                runtime, ctx, headers.get("Authorization", ""), path, optimistic=False)

    @app.after_request
    def _finish(response: Response) -> Response:
        req, gg = request._get_current_object(), g._get_current_object()  # type: ignore[attr-defined]
        headers = response.headers
        rid = gg.get("request_id", "")
        headers["X-Request-Id"] = rid
        for name, value in web.DEFAULT_HEADERS:
            headers.setdefault(name, value)
        status = response.status_code
        elapsed = time.perf_counter() - gg.get("started", time.perf_counter())
        traffic.answered(req.method, req.path, req.endpoint or "unmatched", status, elapsed,
                         gg.get("actor"), rid)
        span = gg.get("span")
        if span is not None:
            span.answered(status)
        return response

    @app.teardown_request
    def _reset(_exc: BaseException | None) -> None:
        span = g.pop("span", None)  # a stream's ends when its last byte is sent
        if span is not None:
            span.end()
        token = g.pop("scope_token", None)
        if token is not None:
            scope.unbind(token)


def _error_body(code: str, message: str, details: dict[str, Any] | None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {},
                      "request_id": g.get("request_id")}}


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(CharterError)
    def _charter(exc: CharterError) -> tuple[Response, int]:
        if exc.status >= 500:
            log.warning("request failed", code=exc.code, error=exc.message)
        if gateway_protocol(request.path, request.method) is not None:
            return render_error(exc), exc.status  # an OpenAI or TGI client: its own shape
        if request.path.startswith(web.SCIM_PREFIX):
            return scim.error_response(exc), exc.status  # a SCIM client: SCIM's shape
        response = jsonify(_error_body(exc.code, exc.message, exc.details))
        response.headers.update(error_headers(exc))  # the same as in the gateway's shapes
        return response, exc.status

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = exc.description or exc.name
        details: dict[str, Any] = {}
        if status == 413:
            message = f"the body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes"
            details = {"max_body_bytes": app.config["MAX_CONTENT_LENGTH"]}
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            details = {"allowed_methods": sorted(exc.valid_methods)}  # type: ignore[attr-defined]
        if gateway_protocol(request.path, request.method) is not None:
            if status == 404:
                message = f"no such route: {request.method} {request.path}"
            return error_response(status, code, message), status
        if request.path.startswith(web.SCIM_PREFIX):
            return scim.error_response(CharterError(message, code=code, status=status)), status
        return jsonify(_error_body(code, message, details)), status

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error", error=repr(exc))
        if request.path.startswith(web.SCIM_PREFIX):
            return scim.error_response(CharterError(
                "an unexpected error occurred", code="internal_error", status=500)), 500
        body = _error_body("internal_error", "an unexpected error occurred", {})
        return jsonify(body), 500


def _install_probes(app: Flask, runtime: Runtime) -> None:
    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok", "version": __version__})

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        checks: dict[str, Any] = {}
        ready = True
        try:
            engine = runtime.database.engine
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
            status = schema_status(engine)
            checks["schema"] = status.as_dict()
            ready = status.current
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            checks["database"] = f"unavailable: {type(exc).__name__}"
            ready = False
        check = getattr(runtime.policies.engine, "check", None)  # the remote engine's (OPA)
        if check is not None:
            try:
                checks["policy"] = check()
            except CharterError as exc:
                checks["policy"] = f"unavailable: {exc.code}"
                ready = False
        return jsonify({"status": "ready" if ready else "not_ready", "checks": checks}), (
            200 if ready else 503
        )

    @app.get("/metrics")
    def metrics() -> Response:
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # charter.serving sets it
        if not shared:  # one process: its own registry
            return Response(generate_latest(runtime.metrics), mimetype=CONTENT_TYPE_LATEST)
        # `charter serve`'s workers (charter.serving): every worker's values, summed, and
        # what the database says now. Process statistics are per worker, so not here.
        registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(registry, path=shared)  # type: ignore[no-untyped-call]
        registry.register(StateCollector(runtime))
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
