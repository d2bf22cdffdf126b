"""The console blueprint: SSO login and logout, session loading, CSRF, security headers."""

from __future__ import annotations

import hmac
import math
import secrets
from dataclasses import dataclass

import structlog
from flask import (
    Flask,
    current_app,
    g,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
)
from werkzeug.wrappers import Response

from charter.console.blueprint import bp
from charter.console.oidc import (
    LOGIN_COOKIE,
    LOGIN_MAX_AGE_S,
    LoginFailed,
    LoginStateCodec,
    OidcClient,
    origin_of,
)
from charter.errors import CharterError, ForbiddenError, UnauthenticatedError
from charter.identity import sessions
from charter.identity.ratelimit import FailureLimiter
from charter.identity.service import list_users
from charter.settings import Settings

log = structlog.get_logger("charter.console")

SESSION_COOKIE = "__Host-charter_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PUBLIC_ENDPOINTS = frozenset({"console.login", "console.callback", "console.static",
                               "console.demo_login"})
DEMO_COOKIE = "charter_demo_login"



@dataclass
class ConsoleState:
    settings: Settings
    oidc: OidcClient | None  # None when SSO is not configured
    codec: LoginStateCodec
    limiter: FailureLimiter


class SsoNotConfiguredError(CharterError):
    status = 503
    code = "sso_not_configured"


def _state() -> ConsoleState:
    state: ConsoleState = current_app.extensions["charter.console"]
    return state


def _oidc() -> OidcClient:
    oidc = _state().oidc
    if oidc is None:
        raise SsoNotConfiguredError(
            "single sign-on is not configured: set CHARTER_OIDC_ISSUER, "
            "CHARTER_OIDC_CLIENT_ID and CHARTER_PUBLIC_URL"
        )
    return oidc


def _client_address() -> str:
    return request.remote_addr or "unknown"


# --- responses ------------------------------------------------------------------------

def _wants_json() -> bool:
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def _error(status: int, code: str, message: str) -> Response:
    if _wants_json():
        response = jsonify({"error": {"code": code, "message": message, "details": {},
                                      "request_id": g.get("request_id")}})
    else:
        if status == 401 or request.endpoint in ("console.login", "console.callback"):
            title = "Sign-in problem"
        else:
            title = "Request refused" if status < 500 else "Service unavailable"
        response = make_response(render_template(
            "console/error.html", status=status, code=code, message=message, title=title,
            sign_in=_state().oidc is not None and title == "Sign-in problem",
        ))
    response.status_code = status
    return response


def _set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
    # __Host- prefix: Secure, Path=/ and no Domain, so no sibling host can set or read it.
    response.set_cookie(name, value, max_age=max_age, path="/", secure=True, httponly=True,
                        samesite="Lax")


def _clear_cookie(response: Response, name: str) -> None:
    response.delete_cookie(name, path="/", secure=True, httponly=True, samesite="Lax")


@bp.errorhandler(CharterError)
def _charter_error(exc: CharterError) -> Response:
    response = _error(exc.status, exc.code, exc.message)
    if exc.status == 401 and request.cookies.get(SESSION_COOKIE):
        _clear_cookie(response, SESSION_COOKIE)
    return response


# --- every console request -------------------------------------------------------------

@bp.before_request
def _load_session() -> Response | None:
    g.console = None
    if request.endpoint in _PUBLIC_ENDPOINTS:
        return None
    loaded = sessions.load_session(_state().settings, request.cookies.get(SESSION_COOKIE, ""))
    if loaded is None:
        if request.method in _SAFE_METHODS:
            response = redirect("/console/login", code=302)
            if request.cookies.get(SESSION_COOKIE):
                _clear_cookie(response, SESSION_COOKIE)
            return response
        raise UnauthenticatedError("sign in to the console first", code="unauthenticated")
    g.console = loaded
    g.actor = loaded.actor
    if request.method not in _SAFE_METHODS:
        sent = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode("utf-8"), loaded.csrf_token.encode("utf-8")):
            log.warning("csrf check failed", path=request.path, actor=loaded.actor.ref)
            raise ForbiddenError("the form is missing its security token or it is stale; "
                                 "reload the page and try again", code="csrf_failed")
    return None


def _security_headers(response: Response) -> Response:
    if not (request.path == "/console" or request.path.startswith("/console/")):
        return response
    state: ConsoleState | None = current_app.extensions.get("charter.console")
    form_action = ["'self'"]
    if state is not None and state.oidc is not None:
        # The logout form's answer redirects to the IdP's end-session endpoint, and
        # browsers apply form-action to that redirect too.
        end_session = state.oidc.known_metadata().get("end_session_endpoint")
        for url in (state.settings.oidc_issuer, end_session):
            origin = origin_of(url) if isinstance(url, str) else None
            if origin and origin not in form_action:
                form_action.append(origin)
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; frame-ancestors 'none'; object-src 'none'; base-uri 'none'; "
        f"form-action {' '.join(form_action)}"
    )
    response.headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response


# --- routes ------------------------------------------------------------------------------

@bp.get("/login")
def login() -> Response:
    state = _state()
    if state.oidc is None and state.settings.demo:
        return _demo_login_page()
    oidc = _oidc()
    try:
        url, login_state = oidc.begin()
    except LoginFailed as exc:
        log.warning("sso login could not start", reason=exc.reason)
        return _error(exc.status, exc.reason, exc.message)
    response = redirect(url, code=302)
    _set_cookie(response, LOGIN_COOKIE, _state().codec.dumps(login_state), LOGIN_MAX_AGE_S)
    return response


@bp.get("/callback")
def callback() -> Response:
    state = _state()
    oidc = _oidc()
    client = _client_address()
    wait = state.limiter.retry_after(client)
    if wait is not None:
        log.warning("sso callback refused: too many failures", client=client)
        response = _error(429, "rate_limited",
                          "too many failed sign-ins from this address; try again later")
        response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return response
    try:
        expected = state.codec.loads(request.cookies.get(LOGIN_COOKIE))
        claims, id_token = oidc.finish(request.args.to_dict(flat=True), expected)
        try:
            started = sessions.start_session(
                state.settings, claims, id_token=id_token,
                previous_id=request.cookies.get(SESSION_COOKIE),
            )
        except CharterError as exc:
            if exc.status >= 500:
                raise
            raise LoginFailed(exc.code, 401, exc.message,
                              subject=str(claims.get("sub", ""))[:300]) from exc
    except LoginFailed as exc:
        return _login_failed(state, client, exc)
    log.info("console login", actor=started.actor.ref, rotated=started.ended_previous)
    response = redirect("/console/", code=303)
    _clear_cookie(response, LOGIN_COOKIE)
    _set_cookie(response, SESSION_COOKIE, started.session_id, state.settings.session_max_age_s)
    return response


def _login_failed(state: ConsoleState, client: str, exc: LoginFailed) -> Response:
    log.warning("sso callback refused", reason=exc.reason, client=client)
    if exc.counts:
        state.limiter.fail(client)
    sessions.record_login_failure(reason=exc.reason, client=client,
                                  issuer=state.settings.oidc_issuer, subject=exc.subject,
                                  idp_error=exc.idp_error)
    response = _error(exc.status, exc.reason, exc.message)
    _clear_cookie(response, LOGIN_COOKIE)  # one callback per login: a replay finds nothing
    return response


def _demo_login_page() -> Response:
    """The embedded demo has no identity provider: pick a seeded person. Never offered
    outside demo mode (CHARTER_DEMO), where /console/login is SSO only."""
    nonce = secrets.token_urlsafe(24)
    people = [u for u in list_users() if u.kind == "user" and u.active]
    response = make_response(render_template("console/demo_login.html", people=people,
                                             nonce=nonce, me=None, nav=[]))
    _set_cookie(response, DEMO_COOKIE, nonce, LOGIN_MAX_AGE_S)
    return response


@bp.post("/demo-login")
def demo_login() -> Response:
    state = _state()
    if state.oidc is not None or not state.settings.demo:
        raise ForbiddenError("sign in through single sign-on", code="forbidden")
    sent = request.form.get("nonce", "")
    kept = request.cookies.get(DEMO_COOKIE, "")
    if not kept or not hmac.compare_digest(sent.encode(), kept.encode()):
        raise ForbiddenError("the sign-in form is stale; reload it", code="csrf_failed")
    started = sessions.start_demo_session(state.settings, request.form.get("user_id", ""))
    response = redirect("/console/", code=303)
    _clear_cookie(response, DEMO_COOKIE)
    _set_cookie(response, SESSION_COOKIE, started.session_id, state.settings.session_max_age_s)
    return response


@bp.post("/logout")
def logout() -> Response:
    loaded: sessions.LoadedSession = g.console
    hint = sessions.end_session(loaded.id_sha256, loaded.actor)
    oidc = _state().oidc
    target = (oidc.logout_url(hint) if oidc is not None else None) or "/console/login"
    response = redirect(target, code=303)
    _clear_cookie(response, SESSION_COOKIE)
    return response


def install(app: Flask, settings: Settings) -> None:
    sso = bool(settings.oidc_issuer and settings.oidc_client_id and settings.public_url)
    app.extensions["charter.console"] = ConsoleState(
        settings=settings,
        oidc=OidcClient(app, settings) if sso else None,
        codec=LoginStateCodec(settings.effective_secret_key),
        # Shared with the API's bearer authentication when the app has one: an address
        # guessing there is also blocked here, and the other way round.
        limiter=app.extensions.get("charter.auth_limiter") or FailureLimiter(
            settings.auth_failure_limit, settings.auth_failure_window_s),
    )
    app.register_blueprint(bp)
    app.after_request(_security_headers)
