"""The embedded demo's console sign-in (no identity provider): only in demo mode, a form
with its own nonce, a real server-side session, audited; never offered otherwise."""

from __future__ import annotations

import dataclasses
import re

from charter.audit.service import EventFilter, list_events
from tests.console_support import BASE


def test_the_demo_signs_in_a_seeded_person(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    approver = make_person("approver", username="ada-approver")
    client = app_for(dataclasses.replace(configured, demo=True)).test_client()
    page = client.get(f"{BASE}/console/login")
    assert page.status_code == 200 and "Sign in as ada-approver" in page.text
    nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    r = client.post(f"{BASE}/console/demo-login",
                    data={"nonce": "forged", "user_id": approver.actor.user_id})
    assert r.status_code == 403 and 'data-code="csrf_failed"' in r.text
    r = client.post(f"{BASE}/console/demo-login",
                    data={"nonce": nonce, "user_id": approver.actor.user_id})
    assert r.status_code == 303 and r.headers["Location"] == "/console/"
    home = client.get(f"{BASE}/console/")
    assert home.status_code == 200 and '<span class="tag">approver</span>' in home.text
    logins = list_events(EventFilter(action="auth.login"))
    assert [e.details["via"] for e in logins] == ["console-demo"]


def test_outside_the_demo_there_is_no_such_door(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    approver = make_person("approver")
    client = app_for(configured).test_client()
    page = client.get(f"{BASE}/console/login")
    assert page.status_code == 503 and "sso_not_configured" in page.text
    client.set_cookie("charter_demo_login", "n", domain="localhost")
    r = client.post(f"{BASE}/console/demo-login",
                    data={"nonce": "n", "user_id": approver.actor.user_id})
    assert r.status_code == 403 and 'data-code="forbidden"' in r.text
    assert list_events(EventFilter(action="auth.login")) == []
