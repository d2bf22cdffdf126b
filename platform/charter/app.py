"""create_app(): the one Flask application factory."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import structlog
from flask import Flask, Response, current_app, g, jsonify, request
from flask.sessions import SecureCookieSessionInterface
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from sqlalchemy import text
from werkzeug.exceptions import HTTPException

from charter import __version__, db, tasks
from charter.apikit import openapi_document
from charter.audit.service import append_event
from charter.context import request_id_var
from charter.db import unit_of_work
from charter.errors import CharterError, SchemaOutdatedError, UnauthenticatedError
from charter.identity.jwt import AccessTokenVerifier
from charter.identity.ratelimit import FailureLimiter
from charter.identity.service import KEY_PREFIX, authenticate_api_key
from charter.identity.sso import provision
from charter.logs import configure_logging
from charter.migrate import schema_status
from charter.policy import service as policy
from charter.settings import Settings
from charter.snapshot import SNAPSHOT, generation_var, read_generation

log = structlog.get_logger("charter.http")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HTTP_CODES = {
    400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
    429: "rate_limited",
}
REQUESTS = Counter(
    "charter_http_requests_total", "HTTP requests answered", ["method", "endpoint", "status"]
)
LATENCY = Histogram(
    "charter_http_request_seconds", "HTTP request latency", ["method", "endpoint"]
)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/api/v1/openapi.json",
                          "/api/v1/audit/keys"})


class _ConsoleSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie session, for the console's pages only (their flashed notices;
    sign-in lives in console.sessions, server-side). The API and the gateway are stateless:
    their requests open no session (a signer and a cookie parse on every gateway request)."""

    def open_session(self, app: Flask, request: Any) -> Any:
        if not request.path.startswith("/console"):
            return self.make_null_session(app)
        return super().open_session(app, request)


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    settings.require_secret()
    configure_logging(settings)
    database = db.configure(settings)
    policy.configure(settings)
    tasks.configure(settings)
    if settings.schema_check:
        status = schema_status(database.engine)
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
    app.extensions["charter.settings"] = settings
    app.extensions["charter.auth_limiter"] = FailureLimiter(
        settings.auth_failure_limit, settings.auth_failure_window_s)
    if settings.oidc_issuer:
        app.extensions["charter.jwt"] = AccessTokenVerifier(settings)

    _install_request_hooks(app)
    _install_error_handlers(app)
    _install_probes(app, settings)

    from charter.audit.api import bp as audit_bp
    from charter.batches.api import bp as batches_bp
    from charter.dispatch.gateway import bp as gateway_bp
    from charter.exports.api import bp as exports_bp
    from charter.identity.api import bp as identity_bp
    from charter.nodes.api import bp as nodes_bp
    from charter.policy.api import bp as policy_bp
    from charter.registry.api import bp as registry_bp

    for bp in (registry_bp, identity_bp, audit_bp, policy_bp, nodes_bp, gateway_bp,
               batches_bp, exports_bp):
        app.register_blueprint(bp)

    from charter.console import register_console
    register_console(app, settings)

    @app.get("/api/v1/openapi.json")
    def openapi() -> Response:
        return jsonify(openapi_document("Charter API", __version__))

    return app


def _install_request_hooks(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        incoming = request.headers.get("X-Request-Id", "")
        rid = incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(16)
        g.request_id = rid
        g.token = request_id_var.set(rid)
        g.started = time.perf_counter()
        g.actor = None
        if request.path not in PUBLIC_PATHS and not request.path.startswith(
                ("/console", "/static")):
            _authenticate()  # the API and the gateway; the console has its own sessions

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id", "")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        endpoint = request.endpoint or "unmatched"
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        REQUESTS.labels(request.method, endpoint, response.status_code).inc()
        LATENCY.labels(request.method, endpoint).observe(elapsed)
        if request.path not in ("/metrics", "/healthz"):
            actor = g.get("actor")
            log.info(
                "request", method=request.method, path=request.path,
                status=response.status_code, ms=round(elapsed * 1000, 2),
                actor=actor.ref if actor else None, request_id=g.get("request_id"),
            )
        return response

    @app.teardown_request
    def _reset(_exc: BaseException | None) -> None:
        token = g.pop("token", None)
        if token is not None:
            request_id_var.reset(token)
        generation = g.pop("generation_token", None)
        if generation is not None:
            generation_var.reset(generation)


# Gateway routes that decide through dispatch.admit(): they may authenticate on the newest
# generation this process knows, because admit() commits only if it is still current.
OPTIMISTIC_ENDPOINTS = frozenset({"gateway.chat_completions", "gateway.completions",
                                  "gateway.generate", "gateway.generate_stream",
                                  "gateway.compat"})


def _authenticate() -> None:
    """API keys (`chk_...`) or, with SSO configured, the IdP's JWT access tokens.

    Every failure is audited (never with the token) and counted per client address;
    past the limit the address is refused with 429 until the window passes.
    """
    header = request.headers.get("Authorization", "")
    if not header:
        return  # the operation decides: public ones pass, others answer 401
    client = request.remote_addr or "unknown"
    limiter: FailureLimiter = current_app.extensions["charter.auth_limiter"]
    retry = limiter.retry_after(client)
    if retry is not None:
        raise CharterError("too many failed authentications; try again later",
                           code="rate_limited", status=429,
                           details={"retry_after_s": int(retry) + 1})
    known = SNAPSHOT.latest if request.endpoint in OPTIMISTIC_ENDPOINTS else None
    if known is not None:
        try:
            authenticate_request(known, record_failure=False)
            return
        except UnauthenticatedError:
            pass  # perhaps the cache is behind: decide, and record, on what is current
    authenticate_request(read_generation())


def authenticate_request(generation: int, *, record_failure: bool = True) -> None:
    """Set `g.actor` from the Authorization header, reading through the read cache of
    `generation` (also called again by the gateway when that generation went stale)."""
    token_ = generation_var.set(generation)
    if "generation_token" not in g:
        g.generation_token = token_  # reset to the value before the first set
    header = request.headers.get("Authorization", "")
    client = request.remote_addr or "unknown"
    limiter: FailureLimiter = current_app.extensions["charter.auth_limiter"]
    scheme, _, token = header.partition(" ")
    token = token.strip()
    method = "api_key" if token.startswith(f"{KEY_PREFIX}_") else "jwt"
    g.actor = None
    try:
        if scheme.lower() != "bearer" or not token:
            raise UnauthenticatedError("use `Authorization: Bearer <API key or token>`",
                                       code="invalid_credentials")
        if method == "api_key":
            g.actor = authenticate_api_key(token)
            return
        verifier = current_app.extensions.get("charter.jwt")
        if verifier is None:
            raise UnauthenticatedError("invalid API key", code="invalid_credentials")
        claims = verifier.verify(token)
        g.actor = provision(current_app.extensions["charter.settings"], claims, via="api")
    except UnauthenticatedError as exc:
        if not record_failure:
            raise
        if exc.status == 401:
            limiter.fail(client)
        details = {"code": exc.code, "method": method, "client": client}
        if method == "api_key" and token.count("_") >= 2:
            details["key_id"] = token.split("_", 2)[1][:16]  # the public part only
        with unit_of_work():
            append_event(actor="anonymous", action="auth.failed", target_type="auth",
                         target_id=method, outcome="denied", details=details)
        raise


def _error_body(code: str, message: str, details: dict[str, Any] | None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {},
                      "request_id": g.get("request_id")}}


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(CharterError)
    def _charter(exc: CharterError) -> tuple[Response, int]:
        if exc.status >= 500:
            log.warning("request failed", code=exc.code, error=exc.message)
        response = jsonify(_error_body(exc.code, exc.message, exc.details))
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="charter"'
        if exc.status == 429 and "retry_after_s" in exc.details:
            response.headers["Retry-After"] = str(exc.details["retry_after_s"])
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
        return jsonify(_error_body(code, message, details)), status

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error", error=repr(exc))
        body = _error_body("internal_error", "an unexpected error occurred", {})
        return jsonify(body), 500


def _install_probes(app: Flask, settings: Settings) -> None:
    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok", "version": __version__})

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        checks: dict[str, Any] = {}
        ready = True
        try:
            engine = db.get_database().engine
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
            status = schema_status(engine)
            checks["schema"] = status.as_dict()
            ready = status.current
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            checks["database"] = f"unavailable: {type(exc).__name__}"
            ready = False
        check = getattr(policy.get_engine(), "check", None)  # the remote engine's (OPA)
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
        return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)
