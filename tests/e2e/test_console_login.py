"""Console SSO end to end: a real OIDC provider process, real PostgreSQL, Charter's app.

The provider is `oidc-provider-mock` started as its own process with client registration
and nonces required. The browser is played by hand: Flask's test client for Charter (over
https, so Secure cookies travel) and httpx for the provider, following redirects one by one.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.test import TestResponse

from charter.audit.service import EventFilter, list_events
from charter.console.oidc import LOGIN_COOKIE, LoginState, LoginStateCodec
from charter.db import utcnow
from charter.identity.models import ConsoleSession, Team, TeamMember, User
from charter.identity.service import set_roles
from charter.identity.sessions import digest
from charter.settings import Settings
from charter.uow import unit_of_work

BASE = "https://localhost"
PUBLIC_URL = "http://localhost"
REDIRECT_URI = f"{PUBLIC_URL}/console/callback"
SESSION_COOKIE = "__Host-charter_session"
ROLE_MAP = {"ai-approvers": ["approver"], "ai-auditors": ["auditor"]}
TEAM_MAP = {"helpdesk-devs": "helpdesk"}
SECURITY_HEADERS = {
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


# --- the identity provider: a real process -------------------------------------------------

@dataclass(frozen=True)
class Provider:
    issuer: str
    client_id: str
    client_secret: str
    http: httpx.Client

    def add_user(self, sub: str, **claims: Any) -> None:
        r = self.http.put(f"{self.issuer}/users/{quote(sub, safe='')}", json=claims)
        assert r.status_code == 204, r.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    port = _free_port()
    issuer = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "oidc_provider_mock", "--host", "127.0.0.1",
             "--port", str(port), "--require-registration", "true",
             "--require-nonce", "true"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        http = httpx.Client(timeout=5.0)
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"the OIDC provider exited: {log.read().decode()[-2000:]}")
                try:
                    if http.get(f"{issuer}/.well-known/openid-configuration").is_success:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail("the OIDC provider did not start within 30 s")
                time.sleep(0.1)
            # Registration is required: unknown clients and redirect URIs are refused.
            r = http.post(f"{issuer}/oauth2/clients", json={
                "redirect_uris": [REDIRECT_URI],
                "token_endpoint_auth_method": "client_secret_basic",
            })
            assert r.status_code == 201, r.text
            client = r.json()
            yield Provider(issuer, client["client_id"], client["client_secret"], http)
        finally:
            http.close()
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def sso_settings(base: Settings, provider: Provider, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        oidc_issuer=provider.issuer, oidc_client_id=provider.client_id,
        oidc_client_secret=provider.client_secret, oidc_audience=provider.client_id,
        public_url=PUBLIC_URL, oidc_role_map=json.dumps(ROLE_MAP),
        oidc_team_map=json.dumps(TEAM_MAP),
    )
    values.update(overrides)
    settings = dataclasses.replace(base, **values)
    settings.validate()
    return settings


@pytest.fixture
def sso(configured: Settings, provider: Provider) -> Settings:
    return sso_settings(configured, provider)


@pytest.fixture
def make_app() -> Callable[[Settings], Flask]:
    from tests.runtimes import app_for

    return app_for


@pytest.fixture
def console(sso: Settings, make_app: Callable[[Settings], Flask]) -> Flask:
    return make_app(sso)


# --- a browser, played by hand --------------------------------------------------------------

@dataclass
class Login:
    authorize_url: str
    login_cookie: str
    callback_url: str  # path and query, as the provider redirected to it
    response: TestResponse


class Browser:
    def __init__(self, app: Flask, provider: Provider) -> None:
        self.client: FlaskClient = app.test_client()
        self.provider = provider

    def get(self, path: str, **kwargs: Any) -> TestResponse:
        return self.client.get(path, base_url=BASE, **kwargs)

    def post(self, path: str, **kwargs: Any) -> TestResponse:
        return self.client.post(path, base_url=BASE, **kwargs)

    def cookie(self, name: str) -> str | None:
        c = self.client.get_cookie(name)
        return c.value if c is not None else None

    def set_cookie(self, name: str, value: str) -> None:
        self.client.set_cookie(name, value, secure=True, httponly=True, samesite="Lax")

    def start(self) -> tuple[str, str]:
        """GET /console/login: (the provider's authorization URL, the login cookie)."""
        r = self.get("/console/login")
        assert r.status_code == 302, r.text
        cookie = self.cookie(LOGIN_COOKIE)
        assert cookie
        return r.headers["Location"], cookie

    def authorize(self, authorize_url: str, sub: str, **form: str) -> str:
        """Log in at the provider (POST of `sub`); the callback's path and query."""
        assert authorize_url.startswith(self.provider.issuer + "/")
        r = self.provider.http.post(authorize_url, data={"sub": sub, **form})
        assert r.status_code == 302, r.text
        location = r.headers["Location"]
        assert location.startswith(REDIRECT_URI + "?")
        return location[len(PUBLIC_URL):]

    def login(self, sub: str) -> Login:
        authorize_url, cookie = self.start()
        callback = self.authorize(authorize_url, sub)
        return Login(authorize_url, cookie, callback, self.get(callback))

    def csrf_token(self) -> str:
        r = self.get("/console/")
        assert r.status_code == 200
        match = re.search(r'name="csrf_token" value="([^"]+)"', r.text)
        assert match
        return match.group(1)


@pytest.fixture
def browser(console: Flask, provider: Provider) -> Browser:
    return Browser(console, provider)


def new_user(provider: Provider, *groups: str) -> str:
    sub = f"sub-{uuid.uuid4().hex[:10]}"
    name = f"ada-{sub[4:]}"
    provider.add_user(sub, email=f"{name}@example.org", preferred_username=name,
                      name="Ada Lovelace", groups=list(groups))
    return sub


def set_cookies(response: TestResponse) -> dict[str, str]:
    """Set-Cookie headers by cookie name."""
    return {h.split("=", 1)[0]: h for h in response.headers.getlist("Set-Cookie")}


def cookie_attributes(header: str) -> dict[str, str]:
    attrs = {}
    for part in header.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        attrs[key.lower()] = value
    return attrs


def failures(reason: str | None = None) -> list[dict[str, Any]]:
    events = list_events(EventFilter(action="auth.login_failed", limit=1000))
    return [e.details for e in events if reason is None or e.details["reason"] == reason]


def user_of(sub: str) -> User:
    with unit_of_work() as session:
        user = session.scalar(select(User).where(User.external_subject == sub))
        assert user is not None
        return user


def session_row(cookie_value: str) -> ConsoleSession | None:
    with unit_of_work() as session:
        return session.get(ConsoleSession, digest(cookie_value))


def assert_error(r: TestResponse, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:500])
    if r.is_json:
        assert r.get_json()["error"]["code"] == code
    else:
        assert f'data-code="{code}"' in r.text


# --- tests ------------------------------------------------------------------------------------

def test_login_provisions_user_roles_and_teams(browser: Browser, provider: Provider,
                                               sso: Settings) -> None:
    with unit_of_work() as session:
        session.add(Team(id=str(uuid.uuid4()), name="helpdesk"))
    sub = new_user(provider, "ai-approvers", "helpdesk-devs", "unmapped")

    authorize_url, login_cookie = browser.start()
    query = parse_qs(urlsplit(authorize_url).query)
    assert query["response_type"] == ["code"]
    assert query["client_id"] == [provider.client_id]
    assert query["redirect_uri"] == [REDIRECT_URI]
    assert set(query["scope"][0].split()) == {"openid", "profile", "email"}
    assert query["code_challenge_method"] == ["S256"]
    pending = LoginStateCodec(sso.effective_secret_key).loads(login_cookie)
    challenge = base64.urlsafe_b64encode(
        hashlib.sha256(pending.code_verifier.encode()).digest()).rstrip(b"=").decode()
    assert query["code_challenge"] == [challenge]
    assert query["state"] == [pending.state] and query["nonce"] == [pending.nonce]

    r = browser.get(browser.authorize(authorize_url, sub))
    assert r.status_code == 303 and r.headers["Location"] == "/console/"
    cookies = set_cookies(r)
    session_attrs = cookie_attributes(cookies[SESSION_COOKIE])
    assert {"secure", "httponly", "path", "samesite"} <= set(session_attrs)
    assert session_attrs["path"] == "/" and session_attrs["samesite"] == "Lax"
    assert "domain" not in session_attrs
    assert int(session_attrs["max-age"]) == sso.session_max_age_s
    assert cookie_attributes(cookies[LOGIN_COOKIE])["max-age"] == "0"  # used up
    session_id = browser.cookie(SESSION_COOKIE)
    assert session_id and len(base64.urlsafe_b64decode(session_id + "=")) == 32

    home = browser.get("/console/")
    assert home.status_code == 200
    user = user_of(sub)
    assert user.username == f"ada-{sub[4:]}" and user.email == f"ada-{sub[4:]}@example.org"
    assert user.external_issuer == provider.issuer and user.roles == ["approver"]
    for text in (user.username, "approver", "helpdesk (member)", "Ada Lovelace"):
        assert text in home.text
    with unit_of_work() as session:
        memberships = list(session.scalars(select(TeamMember)
                                           .where(TeamMember.user_id == user.id)))
    assert [(m.source, m.team_role) for m in memberships] == [("idp", "member")]

    row = session_row(session_id)
    assert row is not None and row.user_id == user.id and row.ended_at is None
    assert row.id_sha256 == hashlib.sha256(session_id.encode()).hexdigest()
    assert len(row.csrf_token) >= 32 and row.csrf_token in home.text
    assert abs(row.expires_at - (row.created_at + timedelta(seconds=sso.session_max_age_s))) \
        < timedelta(seconds=1)

    (login,) = [e for e in list_events(EventFilter(action="auth.login"))]
    assert login.actor == f"user:{user.username}" and login.target_id == user.id
    assert login.details["via"] == "console" and login.details["issuer"] == provider.issuer
    assert row.id_token_hint and row.id_token_hint not in json.dumps(login.details)


def test_second_login_rotates_the_session_id(browser: Browser, provider: Provider,
                                             console: Flask) -> None:
    sub = new_user(provider)
    assert browser.login(sub).response.status_code == 303
    first = browser.cookie(SESSION_COOKIE)
    assert browser.login(sub).response.status_code == 303
    second = browser.cookie(SESSION_COOKIE)
    assert first and second and first != second
    old = session_row(first)
    assert old is not None and old.ended_at is not None
    assert browser.get("/console/").status_code == 200

    other = Browser(console, provider)  # whoever kept the old id gets nothing for it
    other.set_cookie(SESSION_COOKIE, first)
    r = other.get("/console/")
    assert r.status_code == 302 and r.headers["Location"] == "/console/login"
    logins = list_events(EventFilter(action="auth.login"))
    assert [e.details["rotated"] for e in logins] == [False, True]


def test_mismatched_state_is_refused_and_audited(browser: Browser, provider: Provider,
                                                 console: Flask) -> None:
    sub = new_user(provider)
    authorize_url, _ = browser.start()
    callback = browser.authorize(authorize_url, sub)
    code = parse_qs(urlsplit(callback).query)["code"][0]

    tampered = re.sub(r"state=[^&]+", "state=forged", callback)
    assert_error(browser.get(tampered), 400, "state_mismatch")
    # A response meant for one browser, delivered to another (login CSRF): refused.
    victim = Browser(console, provider)
    assert_error(victim.get(callback), 400, "state_missing")
    victim.start()  # even while that browser has a login of its own in progress
    assert_error(victim.get(callback), 400, "state_mismatch")
    # A forged pre-login cookie does not verify.
    victim.set_cookie(LOGIN_COOKIE, "e30.forged.signature")
    assert_error(victim.get(callback), 400, "state_invalid")

    assert [f["reason"] for f in failures()] == [
        "state_mismatch", "state_missing", "state_mismatch", "state_invalid"]
    assert code not in json.dumps(failures())
    assert all(f["client"] == "127.0.0.1" and f["via"] == "console" for f in failures())
    with unit_of_work() as session:
        assert session.scalar(select(User).where(User.external_subject == sub)) is None


def test_replayed_callback_is_refused(browser: Browser, provider: Provider) -> None:
    sub = new_user(provider)
    login = browser.login(sub)
    assert login.response.status_code == 303
    # The pre-login cookie was used up: the same response cannot be used twice.
    assert_error(browser.get(login.callback_url), 400, "state_missing")
    # Even with that cookie put back, the provider refuses a code that was redeemed.
    browser.set_cookie(LOGIN_COOKIE, login.login_cookie)
    assert_error(browser.get(login.callback_url), 400, "code_rejected")
    assert [f["reason"] for f in failures()] == ["state_missing", "code_rejected"]
    assert failures("code_rejected")[0]["idp_error"] == "invalid_grant"
    with unit_of_work() as session:
        live = session.scalars(select(ConsoleSession).where(
            ConsoleSession.ended_at.is_(None))).all()
    assert len(live) == 1


def test_provider_refusal_and_invalid_id_tokens(browser: Browser, provider: Provider,
                                                sso: Settings, make_app: Callable) -> None:
    sub = new_user(provider)
    # The user denies consent at the provider. This provider answers error=access_denied
    # without echoing `state` (RFC 6749 says it must), so the response is not attributable.
    authorize_url, cookie = browser.start()
    callback = browser.authorize(authorize_url, sub, action="deny")
    assert "error=access_denied" in callback and "state=" not in callback
    assert_error(browser.get(callback), 400, "state_mismatch")
    # A provider that does echo it gets its error code recorded.
    pending = LoginStateCodec(sso.effective_secret_key).loads(cookie)
    browser.set_cookie(LOGIN_COOKIE, cookie)
    r = browser.get(f"{callback}&state={pending.state}&error_description=no+thanks")
    assert_error(r, 400, "idp_error")
    assert failures("idp_error")[0]["idp_error"] == "access_denied"

    # The ID token carries the nonce of the authorization request; a different one fails.
    authorize_url, cookie = browser.start()
    pending = LoginStateCodec(sso.effective_secret_key).loads(cookie)
    callback = browser.authorize(authorize_url, sub)
    forged = LoginState(pending.state, "another-nonce", pending.code_verifier)
    browser.set_cookie(LOGIN_COOKIE, LoginStateCodec(sso.effective_secret_key).dumps(forged))
    assert_error(browser.get(callback), 401, "id_token_invalid")

    # An ID token whose issuer is not the configured one fails (iss is checked).
    port = urlsplit(provider.issuer).port
    elsewhere = make_app(dataclasses.replace(
        sso, oidc_issuer=f"http://localhost:{port}",
        oidc_discovery_url=f"{provider.issuer}/.well-known/openid-configuration"))
    other = Browser(elsewhere, provider)
    assert_error(other.login(sub).response, 401, "id_token_invalid")

    # A disabled account is refused at login.
    assert browser.login(sub).response.status_code == 303
    with unit_of_work() as session:
        session.scalar(select(User).where(User.external_subject == sub)).active = False
    r = browser.get("/console/")  # its open session ends at the next request
    assert r.status_code == 302
    assert_error(browser.login(sub).response, 401, "account_disabled")
    assert failures("account_disabled")[0]["subject"] == sub
    assert [f["reason"] for f in failures()] == [
        "state_mismatch", "idp_error", "id_token_invalid", "id_token_invalid",
        "account_disabled"]


def test_idle_and_expired_sessions_end(browser: Browser, provider: Provider, sso: Settings,
                                       pg_conn: Any) -> None:
    sub = new_user(provider)
    browser.login(sub)
    session_id = browser.cookie(SESSION_COOKIE)
    assert session_id
    key = digest(session_id)
    assert browser.get("/console/").status_code == 200

    # last_seen_at is written at most every 30 s, not on every request.
    before = session_row(session_id).last_seen_at  # type: ignore[union-attr]
    assert browser.get("/console/").status_code == 200
    assert session_row(session_id).last_seen_at == before  # type: ignore[union-attr]
    pg_conn.execute("UPDATE console_sessions SET last_seen_at = now() - interval '60 seconds'"
                    " WHERE id_sha256 = %s", (key,))
    assert browser.get("/console/").status_code == 200
    assert utcnow() - session_row(session_id).last_seen_at < timedelta(seconds=5)  # type: ignore[union-attr]

    idle = sso.session_idle_timeout_s + 5
    pg_conn.execute("UPDATE console_sessions SET last_seen_at = now() - make_interval("
                    "secs => %s) WHERE id_sha256 = %s", (idle, key))
    r = browser.get("/console/")
    assert r.status_code == 302 and r.headers["Location"] == "/console/login"
    assert cookie_attributes(set_cookies(r)[SESSION_COOKIE])["max-age"] == "0"
    assert session_row(session_id).ended_at is not None  # type: ignore[union-attr]
    # Ended means ended: fresh activity does not bring it back.
    pg_conn.execute("UPDATE console_sessions SET last_seen_at = now() WHERE id_sha256 = %s",
                    (key,))
    browser.set_cookie(SESSION_COOKIE, session_id)
    assert browser.get("/console/").status_code == 302
    assert_error(browser.post("/console/logout", headers={"Accept": "application/json"}),
                 401, "unauthenticated")

    browser.login(sub)  # past its absolute lifetime a session is refused as well
    pg_conn.execute("UPDATE console_sessions SET expires_at = now() - interval '1 second'"
                    " WHERE id_sha256 = %s", (digest(browser.cookie(SESSION_COOKIE) or ""),))
    assert browser.get("/console/").status_code == 302


def test_role_changes_apply_on_the_next_request(browser: Browser, provider: Provider,
                                                make_person: Callable) -> None:
    sub = new_user(provider, "ai-approvers")
    browser.login(sub)
    home = browser.get("/console/").text
    assert '<span class="tag">approver</span>' in home
    user = user_of(sub)
    admin = make_person("admin")
    set_roles(admin.actor, user.id, ["auditor", "steward"], row_version=user.row_version)
    home = browser.get("/console/").text
    assert '<span class="tag">auditor</span>' in home
    assert '<span class="tag">steward</span>' in home
    assert '<span class="tag">approver</span>' not in home


def test_logout_needs_csrf_ends_the_session_and_is_audited(
    browser: Browser, provider: Provider, console: Flask,
) -> None:
    sub = new_user(provider)
    browser.login(sub)
    session_id = browser.cookie(SESSION_COOKIE)
    assert session_id
    token = browser.csrf_token()

    assert_error(browser.post("/console/logout"), 403, "csrf_failed")
    assert_error(browser.post("/console/logout", data={"csrf_token": "x" * len(token)},
                              headers={"Accept": "application/json"}), 403, "csrf_failed")
    other = Browser(console, provider)  # another session's token is no good either
    other.login(new_user(provider))
    assert_error(browser.post("/console/logout", data={"csrf_token": other.csrf_token()}),
                 403, "csrf_failed")
    assert browser.get("/console/").status_code == 200  # refused attempts changed nothing

    r = browser.post("/console/logout", data={"csrf_token": token})
    assert r.status_code == 303
    assert cookie_attributes(set_cookies(r)[SESSION_COOKIE])["max-age"] == "0"
    end_session = urlsplit(r.headers["Location"])
    assert f"{end_session.scheme}://{end_session.netloc}" == provider.issuer
    params = {k: v[0] for k, v in parse_qs(end_session.query).items()}
    assert params["post_logout_redirect_uri"] == f"{PUBLIC_URL}/console/login"
    assert params["client_id"] == provider.client_id
    payload = params["id_token_hint"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == sub and claims["aud"] in (provider.client_id, [provider.client_id])

    # The provider takes the logout and sends the browser back to the console's login.
    page = provider.http.get(r.headers["Location"])
    assert page.status_code == 200
    back = provider.http.post(f"{provider.issuer}/oauth2/end_session/confirm",
                              data={"redirect_uri": params["post_logout_redirect_uri"]})
    assert back.status_code == 302
    assert back.headers["Location"] == f"{PUBLIC_URL}/console/login"

    assert session_row(session_id).ended_at is not None  # type: ignore[union-attr]
    stale = Browser(console, provider)
    stale.set_cookie(SESSION_COOKIE, session_id)
    assert stale.get("/console/").status_code == 302
    assert_error(stale.post("/console/logout", data={"csrf_token": token}), 401,
                 "unauthenticated")
    (logout,) = list_events(EventFilter(action="auth.logout"))
    assert logout.actor == f"user:{user_of(sub).username}"
    assert logout.details["session"] == digest(session_id)[:16]


def test_security_headers_on_console_responses(browser: Browser, provider: Provider) -> None:
    browser.login(new_user(provider))
    responses = [
        browser.get("/console/"),
        browser.get("/console/static/console.css"),
        browser.get("/console/callback?state=x&code=y"),  # an error page
        browser.get("/console/login"),
    ]
    for r in responses:
        for name, value in SECURITY_HEADERS.items():
            assert r.headers.get(name) == value, (r.request.path, name)
        csp = {d.split()[0]: d.split()[1:] for d in
               r.headers["Content-Security-Policy"].split("; ")}
        assert csp["default-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"]
        assert csp["object-src"] == ["'none'"] and csp["base-uri"] == ["'none'"]
        assert csp["form-action"] == ["'self'", provider.issuer]
        assert r.headers["Cache-Control"] == "no-store"
    assert responses[1].status_code == 200 and "text/css" in responses[1].content_type
    assert "Content-Security-Policy" not in browser.get("/healthz").headers


def test_failed_callbacks_are_rate_limited(provider: Provider, sso: Settings,
                                           make_app: Callable) -> None:
    app = make_app(dataclasses.replace(sso, auth_failure_limit=3, auth_failure_window_s=60))
    browser = Browser(app, provider)
    for _ in range(3):
        assert_error(browser.get("/console/callback?state=guess&code=guess"), 400,
                     "state_missing")
    r = browser.get("/console/callback?state=guess&code=guess")
    assert_error(r, 429, "rate_limited")
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    # While blocked, even a genuine login from that address waits.
    assert_error(browser.login(new_user(provider)).response, 429, "rate_limited")
    elsewhere = app.test_client()  # other addresses are not affected
    r = elsewhere.get("/console/callback?state=guess&code=guess", base_url=BASE,
                      environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert_error(r, 400, "state_missing")
    assert len(failures()) == 4  # blocked attempts are not written to the audit log


def test_unauthenticated_requests(browser: Browser) -> None:
    r = browser.get("/console/")
    assert r.status_code == 302 and r.headers["Location"] == "/console/login"
    assert_error(browser.post("/console/logout"), 401, "unauthenticated")
    r = browser.post("/console/logout", headers={"Accept": "application/json"})
    assert r.get_json()["error"]["code"] == "unauthenticated"


def test_console_without_sso_configured(configured: Settings,
                                        make_app: Callable) -> None:
    browser = make_app(configured).test_client()
    r = browser.get("/console/login", base_url=BASE)
    assert_error(r, 503, "sso_not_configured")
    assert "CHARTER_OIDC_ISSUER" in r.text
    r = browser.get("/console/callback?code=x&state=y", base_url=BASE,
                    headers={"Accept": "application/json"})
    assert_error(r, 503, "sso_not_configured")
    assert browser.get("/console/", base_url=BASE).headers["Location"] == "/console/login"
