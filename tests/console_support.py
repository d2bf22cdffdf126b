"""Console tests without a browser: a signed-in session for a person, over https (the
session cookie is Secure and __Host-), and the CSRF token its forms carry."""

from __future__ import annotations

import re
import secrets
from datetime import timedelta
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from charter.console.views import SESSION_COOKIE
from charter.db import utcnow
from charter.identity.models import ConsoleSession
from charter.identity.sessions import digest
from charter.uow import unit_of_work

BASE = "https://localhost"


class Console:
    """A browser tab on the console as one person."""

    def __init__(self, app: Flask, user_id: str) -> None:
        self.client: FlaskClient = app.test_client()
        session_id = secrets.token_urlsafe(32)
        self.csrf = secrets.token_urlsafe(32)
        now = utcnow()
        with unit_of_work() as session:
            session.add(ConsoleSession(
                id_sha256=digest(session_id), user_id=user_id, created_at=now,
                last_seen_at=now, expires_at=now + timedelta(hours=8),
                csrf_token=self.csrf, id_token_hint=None))
        self.client.set_cookie(SESSION_COOKIE, session_id, domain="localhost", secure=True,
                               path="/")

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(BASE + path, **kw)

    def post(self, path: str, data: dict[str, Any] | None = None, *, csrf: bool = True,
             follow: bool = True) -> Any:
        form = dict(data or {})
        if csrf:
            form["csrf_token"] = self.csrf
        r = self.client.post(BASE + path, data=form)
        if follow and r.status_code == 303:
            return self.client.get(BASE + r.headers["Location"]
                                   if r.headers["Location"].startswith("/")
                                   else r.headers["Location"])
        return r


def notices(html: str, kind: str) -> list[str]:
    return [re.sub(r"\s+", " ", m).strip() for m in
            re.findall(rf'<p class="notice {kind}">(.*?)</p>', html, re.S)]
