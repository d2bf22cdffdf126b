"""The console's access pages without a browser: API keys shown once in the answer to the
form (never again), revoked; teams with entitlements, quota and usage; members and service
accounts by the team's managers; users and roles by admins; CSRF and role refusals."""

from __future__ import annotations

import re
import uuid

import pytest

from charter.actor import SYSTEM
from charter.audit.service import EventFilter, list_events
from charter.db import utcnow
from charter.errors import UnauthenticatedError
from charter.identity import service as identity
from charter.identity.teams import create_service_account, create_team, set_member
from charter.metering.models import Usage
from charter.uow import unit_of_work
from tests.console_support import Console, notices

TOKEN = re.compile(r"chk_[0-9a-f]{16}_[A-Za-z0-9_-]{20,}")


def _team(name: str = "helpdesk", quota: int | None = 50):  # type: ignore[no-untyped-def]
    return create_team(SYSTEM, name=name, description="Helpdesk answers",
                       entitlements={"models": ["tiny"], "data_classes": ["internal"],
                                     "regions": ["*"]},
                       requests_per_day=quota, default_data_class="internal")


def test_pages_render_for_every_role_and_users_only_for_readers(app, make_person) -> None:  # type: ignore[no-untyped-def]
    team = _team()
    for role in ("admin", "steward", "approver", "operator", "auditor", "user"):
        person = make_person(role)
        tab = Console(app, person.actor.user_id)
        r = tab.get("/console/access")
        assert r.status_code == 200, role
        assert 'href="/console/access" aria-current="page"' in r.text
        assert person.actor.username in r.text and 'id="key-form"' in r.text
        readers = role in ("admin", "auditor")
        assert ('href="/console/access/users"' in r.text) == readers
        assert ('id="team-helpdesk"' in r.text) == readers  # others see their own teams
        assert ('id="team-form"' in r.text) == (role == "admin")
        r = tab.get("/console/access/users")
        if readers:
            assert r.status_code == 200 and person.actor.username in r.text
            assert ('id="user-form"' in r.text) == (role == "admin")
        else:
            assert r.status_code == 403 and 'data-code="forbidden"' in r.text
        r = tab.get(f"/console/access/teams/{team.id}")
        if readers:
            assert r.status_code == 200 and ('id="team-edit"' in r.text) == (role == "admin")
        else:  # a team one is not in does not exist for one
            assert r.status_code == 404 and 'data-code="team_not_found"' in r.text


def test_an_api_key_is_shown_once_and_revoked(app, make_person) -> None:  # type: ignore[no-untyped-def]
    person = make_person("user")
    tab = Console(app, person.actor.user_id)
    me = person.actor.user_id
    r = tab.post(f"/console/access/users/{me}/api-keys", {"name": "laptop"}, follow=False)
    assert r.status_code == 201 and "Location" not in r.headers
    assert r.headers["Cache-Control"] == "no-store"
    (token,) = set(TOKEN.findall(r.text))
    assert f'value="{token}"' in r.text and "shown only this once" in r.text
    assert identity.authenticate_api_key(token).user_id == me
    _, key_id, secret = token.split("_", 2)
    # Not in any later page, nor kept anywhere the console could show it again.
    later = tab.get("/console/access").text
    assert token not in later and secret not in later
    assert f'id="key-{key_id}"' in later and "laptop" in later
    events = list_events(EventFilter(action="api_key.create", target_id=key_id))
    assert len(events) == 1 and secret not in str(events[0].details)

    r = tab.post(f"/console/access/api-keys/{key_id}/revoke", {"user_id": me})
    assert notices(r.text, "ok") == [f"Revoked the API key laptop ({key_id})."]
    row = r.text[r.text.index(f'id="key-{key_id}"'):]
    assert "revoked" in row[:row.index("</tr>")]
    with pytest.raises(UnauthenticatedError):
        identity.authenticate_api_key(token)
    r = tab.post(f"/console/access/api-keys/{key_id}/revoke", {"user_id": me})
    assert any("(already_revoked)" in n for n in notices(r.text, "error"))

    r = tab.post(f"/console/access/users/{me}/api-keys", {"name": "x", "expires_at": "2001-01-01"})
    assert any("(validation_failed)" in n for n in notices(r.text, "error"))
    r = tab.post(f"/console/access/users/{me}/api-keys", {"name": "forged"}, csrf=False)
    assert r.status_code == 403 and 'data-code="csrf_failed"' in r.text
    # Someone else's keys: refused by the service, whoever asks (an auditor reads, no more).
    auditor = Console(app, make_person("auditor").actor.user_id)
    page = auditor.get(f"/console/access/users/{me}").text
    assert 'id="keys-readonly"' in page and 'id="key-form"' not in page
    assert "Revoke" not in page
    r = auditor.post(f"/console/access/users/{me}/api-keys", {"name": "sneaky"})
    assert any("(forbidden)" in n for n in notices(r.text, "error"))
    assert TOKEN.search(r.text) is None
    stranger = Console(app, make_person("user").actor.user_id)
    r = stranger.post(f"/console/access/users/{me}/api-keys", {"name": "sneaky"}, follow=False)
    assert r.status_code == 404 and 'data-code="user_not_found"' in r.text
    assert [k.name for k in identity.list_api_keys(SYSTEM, me)] == ["test", "laptop"]


def test_teams_members_service_accounts_and_usage(app, make_person) -> None:  # type: ignore[no-untyped-def]
    admin, manager, member = make_person("admin"), make_person("user"), make_person("user")
    outsider = make_person("user")
    tab = Console(app, admin.actor.user_id)
    r = tab.post("/console/access/teams", {
        "name": "helpdesk", "description": "Helpdesk answers", "models": "tiny, big",
        "data_classes": "internal", "regions": "*", "requests_per_day": "50",
        "default_data_class": "internal"})
    assert notices(r.text, "ok") == ["Created team helpdesk."]
    team_id = re.search(r'href="/console/access/teams/([0-9a-f-]+)">helpdesk', r.text).group(1)  # type: ignore[union-attr]
    r = tab.post("/console/access/teams", {"name": "Bad Name"})
    assert any("(validation_failed)" in n for n in notices(r.text, "error"))
    r = tab.post(f"/console/access/teams/{team_id}/members",
                 {"username": manager.actor.username, "team_role": "manager"})
    assert notices(r.text, "ok") == [f"{manager.actor.username} is a manager of the team."]

    mine = Console(app, manager.actor.user_id)
    page = mine.get(f"/console/access/teams/{team_id}").text
    assert 'id="member-form"' in page and 'id="account-form"' in page
    assert 'id="team-edit"' not in page  # entitlements and quota are the admins'
    set_member(SYSTEM, team_id, member.actor.user_id, "member")
    r = mine.post(f"/console/access/teams/{team_id}/members",
                  {"username": "nobody-at-all", "team_role": "member"})
    assert any("(user_not_found)" in n for n in notices(r.text, "error"))
    r = mine.post(f"/console/access/teams/{team_id}/service-accounts",
                  {"username": "helpdesk-bot", "display_name": "Helpdesk bot"})
    assert notices(r.text, "ok")[0].startswith("Created service account helpdesk-bot")
    bot_id = re.search(r'href="/console/access/users/([0-9a-f-]+)">API keys of helpdesk-bot',
                       r.text).group(1)  # type: ignore[union-attr]
    r = mine.post(f"/console/access/users/{bot_id}/api-keys", {"name": "prod"}, follow=False)
    assert r.status_code == 201 and len(set(TOKEN.findall(r.text))) == 1
    r = mine.post(f"/console/access/teams/{team_id}",
                  {"row_version": "1", "requests_per_day": "5000"}, follow=False)
    assert r.status_code == 403 and 'data-code="forbidden"' in r.text
    assert list_events(EventFilter(action="team.update", outcome="denied"))

    plain = Console(app, member.actor.user_id)
    page = plain.get(f"/console/access/teams/{team_id}").text
    assert 'id="member-form"' not in page and 'id="account-form"' not in page
    bot_page = plain.get(f"/console/access/users/{bot_id}").text
    assert "prod" in bot_page and 'id="keys-readonly"' in bot_page
    r = plain.post(f"/console/access/teams/{team_id}/members",
                   {"username": outsider.actor.username, "team_role": "manager"})
    assert any("(forbidden)" in n for n in notices(r.text, "error"))
    r = Console(app, outsider.actor.user_id).get(f"/console/access/users/{bot_id}")
    assert r.status_code == 404 and 'data-code="user_not_found"' in r.text

    today = utcnow().date()
    with unit_of_work() as session:
        session.add(Usage(team_id=team_id, serving_name="tiny", day=today, requests=3,
                          tokens_in=30, tokens_out=12))
    page = mine.get(f"/console/access/teams/{team_id}").text
    usage = page[page.index('id="usage"'):]
    assert re.search(rf"<td>{today.isoformat()}</td><td><code>tiny</code></td>"
                     r'<td data-field="requests">3</td><td>30</td><td>12</td>', usage)
    assert "3 of 50 requests today" in page
    assert re.search(r'data-field="quota">3 of 50', mine.get("/console/access").text)

    r = tab.post(f"/console/access/teams/{team_id}", {
        "row_version": "1", "description": "", "models": "*", "data_classes": "internal",
        "regions": "eu-central", "requests_per_day": "", "default_data_class": "internal"})
    assert notices(r.text, "ok") == ["Saved team helpdesk."]
    assert "no quota" in r.text and '<span class="tag">eu-central</span>' in r.text
    r = tab.post(f"/console/access/teams/{team_id}", {"row_version": "1", "models": "*"})
    assert any("(stale_version)" in n for n in notices(r.text, "error"))
    r = mine.post(f"/console/access/teams/{team_id}/members/{member.actor.user_id}/remove")
    assert notices(r.text, "ok") == ["Removed the member."]
    assert member.actor.username not in r.text[r.text.index('id="members"'):
                                                r.text.index('id="service-accounts"')]


def test_users_and_roles_are_the_admins(app, make_person) -> None:  # type: ignore[no-untyped-def]
    admin, steward = make_person("admin"), make_person("steward")
    tab = Console(app, admin.actor.user_id)
    name = f"grace-{uuid.uuid4().hex[:6]}"
    r = tab.post("/console/access/users", {"username": name, "display_name": "Grace",
                                           "roles": ["approver", "auditor"]})
    assert notices(r.text, "ok") == [f"Created {name} (approver, auditor)."]
    user = next(u for u in identity.list_users() if u.username == name)
    r = tab.post(f"/console/access/users/{user.id}/roles",
                 {"row_version": str(user.row_version), "roles": ["steward"]})
    assert notices(r.text, "ok") == [f"{name} now has: steward."]
    r = tab.post(f"/console/access/users/{user.id}/roles",
                 {"row_version": str(user.row_version), "roles": ["admin"]})
    assert any("(stale_version)" in n for n in notices(r.text, "error"))
    me = next(u for u in identity.list_users() if u.id == admin.actor.user_id)
    for u in identity.list_users():  # make the signed-in admin the last one
        if u.id != me.id and "admin" in u.roles:
            identity.set_roles(SYSTEM, u.id, [], row_version=u.row_version)
    r = tab.post(f"/console/access/users/{me.id}/roles",
                 {"row_version": str(me.row_version), "roles": ["auditor"]})
    assert any("(last_admin)" in n for n in notices(r.text, "error"))

    other = Console(app, steward.actor.user_id)
    r = other.post(f"/console/access/users/{steward.actor.user_id}/roles",
                   {"row_version": "1", "roles": ["admin"]}, follow=False)
    assert r.status_code == 403 and 'data-code="forbidden"' in r.text
    r = other.post("/console/access/users", {"username": "mallory"}, follow=False)
    assert r.status_code == 403 and 'data-code="forbidden"' in r.text
    r = tab.post("/console/access/users", {"username": "forged"}, csrf=False)
    assert r.status_code == 403 and 'data-code="csrf_failed"' in r.text
    assert "mallory" not in {u.username for u in identity.list_users()}
    assert {e.action for e in list_events(EventFilter(outcome="denied"))} >= {
        "user.set_roles", "user.create"}
    bot = create_service_account(SYSTEM, _team("ops").id, username="ops-bot")
    page = tab.get("/console/access/users").text
    row = page[page.index('id="user-ops-bot"'):]
    assert "of ops" in row[:row.index("</tr>")] and "Save roles" not in row[:row.index("</tr>")]
    assert bot.kind == "service"
