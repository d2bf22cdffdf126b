"""Charter behind an ingress: the client address comes from X-Forwarded-For only through
the configured number of trusted hops; one client's bad tokens cost that client, and valid
credentials are never locked out, not even from the address that failed."""

from __future__ import annotations

import dataclasses

from charter.audit.service import EventFilter, list_events
from tests.runtimes import app_for

BAD = "Bearer chk_0123456789abcdef_wrongsecret"


def _as(client, xff: str, auth: str):  # type: ignore[no-untyped-def]
    return client.get("/api/v1/me", headers={"Authorization": auth, "X-Forwarded-For": xff,
                                             "X-Forwarded-Proto": "https"},
                      environ_base={"REMOTE_ADDR": "10.0.0.5"})  # the ingress


def test_behind_a_trusted_ingress_each_client_pays_for_its_own_failures(  # type: ignore[no-untyped-def]
        configured, make_person) -> None:
    settings = dataclasses.replace(configured, trusted_proxy_hops=1)
    client = app_for(settings).test_client()
    good = make_person("user")
    for _ in range(settings.auth_failure_limit):
        assert _as(client, "203.0.113.7", BAD).status_code == 401
    r = _as(client, "203.0.113.7", BAD)
    assert r.status_code == 429 and r.get_json()["error"]["code"] == "rate_limited"
    # Another client behind the same ingress is not touched, with or without a good key.
    assert _as(client, "203.0.113.8", BAD).get_json()["error"]["code"] == "invalid_credentials"
    assert _as(client, "203.0.113.8", good.headers["Authorization"]).status_code == 200
    # Valid credentials from the flooded address itself still get in.
    assert _as(client, "203.0.113.7", good.headers["Authorization"]).status_code == 200
    failed = list_events(EventFilter(action="auth.failed", limit=1000))
    assert {e.details["client"] for e in failed} == {"203.0.113.7", "203.0.113.8"}
    # Only the trusted hop counts: a client cannot pick its own address by prepending one.
    _as(client, "198.51.100.1, 203.0.113.9", BAD)
    assert list_events(EventFilter(action="auth.failed", limit=1000))[-1].details[
        "client"] == "203.0.113.9"


def test_without_trusted_proxies_the_header_is_ignored(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    client = app_for(configured).test_client()
    _as(client, "203.0.113.7", BAD)
    assert list_events(EventFilter(action="auth.failed"))[-1].details["client"] == "10.0.0.5"
