"""A person who leaves loses every access at once, in one audited transaction: their API
keys (refused on the very next request), console sessions, roles and team memberships;
their teams' service accounts keep running, and a team left without a manager is raised.
Through the admin API here; the identity provider's SCIM calls use the same service."""

from __future__ import annotations

from charter.audit.service import EventFilter, list_events, verify_chain
from tests.batch_support import make_world
from tests.console_support import Console


def test_deprovisioning_ends_every_access_in_one_transaction(configured, make_person,  # type: ignore[no-untyped-def]
                                                             pg_conn) -> None:
    from charter.actor import SYSTEM
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team, set_member
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    try:
        app = app_for(world.settings)
        client = app.test_client()
        leaver = make_person("steward", "approver")
        second_key = create_api_key(SYSTEM, leaver.actor.user_id, name="laptop").token
        alone = create_team(SYSTEM, name="alone", description="", entitlements={
            "models": ["*"], "data_classes": ["*"], "regions": ["*"]}, requests_per_day=None,
            default_data_class="internal")
        shared = create_team(SYSTEM, name="shared", description="", entitlements={},
                             requests_per_day=None, default_data_class="internal")
        stays = make_person("user")
        set_member(SYSTEM, alone.id, leaver.actor.user_id, "manager")
        set_member(SYSTEM, shared.id, leaver.actor.user_id, "manager")
        set_member(SYSTEM, shared.id, stays.actor.user_id, "manager")
        bot = create_service_account(SYSTEM, alone.id, username="alone-bot")
        bot_key = create_api_key(SYSTEM, bot.id, name="k").token
        tab = Console(app, leaver.actor.user_id)
        assert tab.get("/console/").status_code == 200
        for token in (leaver.token, second_key):
            assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}
                              ).status_code == 200

        admin = make_person("admin")
        r = client.post(f"/api/v1/users/{leaver.actor.user_id}/deprovision",
                        headers=admin.headers, json={"reason": "left the company"})
        assert r.status_code == 200, r.get_json()
        done = r.get_json()
        assert len(done["keys_revoked"]) == 2 and done["sessions_ended"] == 1
        assert done["roles_removed"] == ["approver", "steward"]
        assert done["teams_left"] == ["alone", "shared"]
        assert done["unmanaged_teams"] == ["alone"]

        # The very next request with either key is refused; the session is gone.
        for token in (leaver.token, second_key):
            r = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401 and r.get_json()["error"]["code"] == "invalid_credentials"
        assert tab.get("/console/").status_code in (302, 303)
        # The team's service account keeps working.
        assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {bot_key}"}
                          ).status_code == 200
        row = pg_conn.execute("SELECT active, deprovisioned_at IS NOT NULL FROM users "
                              "WHERE id = %s", (leaver.actor.user_id,)).fetchone()
        assert row == (False, True)
        assert pg_conn.execute("SELECT count(*) FROM team_members WHERE user_id = %s",
                               (leaver.actor.user_id,)).fetchone()[0] == 0
        assert pg_conn.execute("SELECT count(*) FROM user_roles WHERE user_id = %s",
                               (leaver.actor.user_id,)).fetchone()[0] == 0

        event = list_events(EventFilter(action="user.deprovision"))[-1]
        assert event.actor == admin.actor.ref and event.details["via"] == "admin"
        assert sorted(event.details["keys_revoked"]) == sorted(done["keys_revoked"])
        alarm = list_events(EventFilter(action="team.unmanaged"))[-1]
        assert (alarm.target_id, alarm.outcome, alarm.details["service_accounts"]) == (
            alone.id, "failure", ["alone-bot"])
        # One transaction: the alarm and the deprovisioning sit side by side in the log.
        assert event.seq == alarm.seq + 1

        # Again: nothing more happens. A service account is not a person.
        again = client.post(f"/api/v1/users/{leaver.actor.user_id}/deprovision",
                            headers=admin.headers, json={"reason": "twice"})
        assert again.status_code == 200 and again.get_json()["keys_revoked"] == []
        assert len(list_events(EventFilter(action="user.deprovision"))) == 1
        r = client.post(f"/api/v1/users/{bot.id}/deprovision", headers=admin.headers,
                        json={"reason": "not a person"})
        assert r.status_code == 409 and r.get_json()["error"]["code"] == "not_a_person"
        r = client.post(f"/api/v1/users/{stays.actor.user_id}/deprovision",
                        headers=stays.headers, json={"reason": "myself"})
        assert r.status_code == 403
        assert verify_chain().ok
    finally:
        world.node.stop()


def test_the_console_shows_where_users_came_from_and_ends_access(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from charter.actor import SYSTEM
    from charter.identity.service import create_api_key
    from tests.console_support import notices
    from tests.runtimes import app_for

    app = app_for(configured)
    leaver = make_person("steward")
    key = create_api_key(SYSTEM, leaver.actor.user_id, name="laptop").token
    assert app.test_client().get("/api/v1/me", headers={
        "Authorization": f"Bearer {key}"}).status_code == 200  # its last activity
    admin = Console(app, make_person("admin").actor.user_id)
    page = admin.get("/console/access/users").text
    row = page.split(f'id="user-{leaver.actor.username}"')[1].split("</tr>")[0]
    assert 'data-source="local"' in row and "<time" in row

    page = admin.post(f"/console/access/users/{leaver.actor.user_id}/deprovision",
                      {"reason": "left the company"}).text
    assert "Access of" in notices(page, "ok")[0] and "2 keys revoked" in notices(page, "ok")[0]
    assert 'id="deprovision"' not in page  # nothing left to end
    history = page.split('id="user-history"')[1]
    assert "user.deprovision" in history and "via admin: 2 keys revoked" in history
    r = admin.get(f"/console/access/users/{leaver.actor.user_id}/offboarding")
    assert r.status_code == 200 and r.get_json()["access_ended"][0]["via"] == "admin"
    row = admin.get("/console/access/users").text.split(
        f'id="user-{leaver.actor.username}"')[1].split("</tr>")[0]
    assert "deprovisioned" in row
    plain = Console(app, make_person("user").actor.user_id)
    assert plain.get(f"/console/access/users/{leaver.actor.user_id}/offboarding"
                     ).status_code == 403
    r = plain.post(f"/console/access/users/{leaver.actor.user_id}/deprovision",
                   {"reason": "try"})
    assert "(forbidden)" in notices(r.text, "error")[0]
