"""Teams: members, service accounts, keys, entitlements; other teams' objects are 404."""

from __future__ import annotations

import dataclasses

import pytest

from charter.audit.service import EventFilter, list_events
from charter.identity.teams import caller_context


@pytest.fixture
def world(client, make_person):  # type: ignore[no-untyped-def]
    admin = make_person("admin")
    alice, bob, eve = make_person("user"), make_person("user"), make_person("user")
    auditor = make_person("auditor")

    def team(name: str) -> dict:
        r = client.post("/api/v1/teams", headers=admin.headers, json={
            "name": name, "entitlements": {"models": ["TinyLlama-1.1B-Chat-v1.0"],
                                           "data_classes": ["internal"], "regions": ["*"]},
            "requests_per_day": 1000})
        assert r.status_code == 201, r.get_json()
        return r.get_json()

    helpdesk, legal = team("helpdesk"), team("legal")
    for person, t, role in ((alice, helpdesk, "manager"), (bob, helpdesk, "member"),
                            (eve, legal, "manager")):
        r = client.put(f"/api/v1/teams/{t['id']}/members/{person.actor.user_id}",
                       headers=admin.headers, json={"team_role": role})
        assert r.status_code == 200, r.get_json()
    return dataclasses.make_dataclass("W", ["admin", "alice", "bob", "eve", "auditor",
                                            "helpdesk", "legal"])(
        admin, alice, bob, eve, auditor, helpdesk, legal)


def test_manager_runs_the_team_service_accounts_and_keys(client, world) -> None:  # type: ignore[no-untyped-def]
    h = world.helpdesk["id"]
    r = client.post(f"/api/v1/teams/{h}/service-accounts", headers=world.alice.headers,
                    json={"username": "helpdesk-bot"})
    assert r.status_code == 201
    bot = r.get_json()
    assert bot["kind"] == "service" and bot["roles"] == ["user"] and bot["owner_team_id"] == h
    r = client.post(f"/api/v1/users/{bot['id']}/api-keys", headers=world.alice.headers,
                    json={"name": "prod"})
    assert r.status_code == 201
    token = r.get_json()["token"]
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).get_json()
    assert me["username"] == "helpdesk-bot"
    # a plain member sees the account but cannot make keys for it
    assert client.get(f"/api/v1/users/{bot['id']}", headers=world.bob.headers).status_code == 200
    r = client.post(f"/api/v1/users/{bot['id']}/api-keys", headers=world.bob.headers,
                    json={"name": "mine"})
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    r = client.post(f"/api/v1/teams/{h}/service-accounts", headers=world.bob.headers,
                    json={"username": "bobs-bot"})
    assert r.get_json()["error"]["code"] == "forbidden"


def test_other_teams_objects_do_not_exist(client, world) -> None:  # type: ignore[no-untyped-def]
    h = world.helpdesk["id"]
    bot = client.post(f"/api/v1/teams/{h}/service-accounts", headers=world.alice.headers,
                      json={"username": "helpdesk-bot"}).get_json()
    key = client.post(f"/api/v1/users/{bot['id']}/api-keys", headers=world.alice.headers,
                      json={"name": "prod"}).get_json()
    eve = world.eve.headers
    for method, url, body in [
        ("GET", f"/api/v1/teams/{h}", None),
        ("GET", f"/api/v1/teams/{h}/members", None),
        ("GET", f"/api/v1/teams/{h}/service-accounts", None),
        ("POST", f"/api/v1/teams/{h}/service-accounts", {"username": "x-bot"}),
        ("PUT", f"/api/v1/teams/{h}/members/{world.eve.actor.user_id}", {"team_role": "member"}),
        ("GET", f"/api/v1/users/{bot['id']}", None),
        ("GET", f"/api/v1/users/{bot['id']}/api-keys", None),
        ("POST", f"/api/v1/users/{bot['id']}/api-keys", {"name": "stolen"}),
        ("POST", f"/api/v1/api-keys/{key['id']}/revoke", None),
    ]:
        r = client.open(url, method=method, headers=eve, json=body)
        assert r.status_code == 404, (method, url, r.get_json())
        missing = client.open(url.replace(h, "0" * 36).replace(bot["id"], "1" * 36)
                              .replace(key["id"], "2" * 16), method=method, headers=eve,
                              json=body)
        assert r.get_json()["error"]["code"] == missing.get_json()["error"]["code"]
        assert r.get_json()["error"]["message"].split()[0] == missing.get_json()["error"][
            "message"].split()[0]
    teams = client.get("/api/v1/teams", headers=eve).get_json()
    assert [t["name"] for t in teams] == ["legal"]
    assert len(client.get("/api/v1/teams", headers=world.auditor.headers).get_json()) == 2


def test_entitlements_merge_over_teams_and_feed_the_caller(client, world) -> None:  # type: ignore[no-untyped-def]
    legal = world.legal
    r = client.patch(f"/api/v1/teams/{legal['id']}", headers=world.admin.headers,
                     json={"row_version": legal["row_version"],
                           "entitlements": {"models": ["gemma-2b-it"],
                                            "data_classes": ["confidential"],
                                            "regions": ["eu-central"]}})
    assert r.status_code == 200
    client.put(f"/api/v1/teams/{legal['id']}/members/{world.bob.actor.user_id}",
               headers=world.admin.headers, json={"team_role": "member"})
    caller = caller_context(world.bob.actor.user_id)
    assert list(caller.teams) == ["helpdesk", "legal"]
    assert list(caller.entitlements.models) == ["TinyLlama-1.1B-Chat-v1.0", "gemma-2b-it"]
    assert list(caller.entitlements.data_classes) == ["confidential", "internal"]
    r = client.patch(f"/api/v1/teams/{legal['id']}", headers=world.admin.headers,
                     json={"row_version": legal["row_version"], "requests_per_day": 5})
    assert r.get_json()["error"]["code"] == "stale_version"
    r = client.patch(f"/api/v1/teams/{legal['id']}", headers=world.eve.headers,
                     json={"row_version": legal["row_version"] + 1, "requests_per_day": 5})
    assert r.get_json()["error"]["code"] == "forbidden"


def test_auditors_read_but_change_nothing(client, world) -> None:  # type: ignore[no-untyped-def]
    a = world.auditor.headers
    h = world.helpdesk["id"]
    assert client.get(f"/api/v1/teams/{h}/members", headers=a).status_code == 200
    for method, url, body in [
        ("POST", "/api/v1/teams", {"name": "new-team"}),
        ("PATCH", f"/api/v1/teams/{h}", {"row_version": 1, "requests_per_day": 1}),
        ("PUT", f"/api/v1/teams/{h}/members/{world.bob.actor.user_id}", {"team_role": "manager"}),
        ("POST", f"/api/v1/teams/{h}/service-accounts", {"username": "aud-bot"}),
        ("POST", "/api/v1/models", {"name": "m", "publisher": "p", "source_repo": "p/m"}),
        ("POST", "/api/v1/users", {"username": "someone"}),
    ]:
        r = client.open(url, method=method, headers=a, json=body)
        assert r.status_code == 403, (url, r.get_json())


def test_failed_authentications_are_audited_and_limited(app, client, make_person) -> None:  # type: ignore[no-untyped-def]
    limit = app.extensions["charter.settings"].auth_failure_limit
    bad = {"Authorization": "Bearer chk_0123456789abcdef_wrongsecret"}
    for _ in range(limit):
        r = client.get("/api/v1/me", headers=bad)
        assert r.status_code == 401 and r.get_json()["error"]["code"] == "invalid_credentials"
    r = client.get("/api/v1/me", headers=bad)
    assert r.status_code == 429 and r.get_json()["error"]["code"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    good = make_person("user")
    r = client.get("/api/v1/me", headers=good.headers)  # same address, valid key: let in
    assert r.status_code == 200, r.get_json()
    failed = list_events(EventFilter(action="auth.failed"))
    assert len(failed) == limit  # the failures past the limit are answered, not recorded
    assert failed[0].details == {"code": "invalid_credentials", "method": "api_key",
                                 "client": "127.0.0.1", "key_id": "0123456789abcdef"}
    assert failed[-1].details["limited_for_s"] == 60  # the trip, said once
    assert all("wrongsecret" not in str(e.details) for e in failed)
