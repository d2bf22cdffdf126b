"""SCIM 2.0 as Entra ID and Okta send it: their recorded request shapes (create, update,
deactivate, reactivate), deprovisioning that ends access at once, the provider's
credential scoped to /scim/v2, and bad input answered with SCIM errors, nothing changed."""

from __future__ import annotations

from typing import Any

import pytest

from charter.audit.service import EventFilter, list_events, verify_chain

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"


@pytest.fixture
def scim(configured) -> tuple[Any, dict[str, str]]:  # type: ignore[no-untyped-def]
    from charter.identity.service import scim_credential
    from tests.runtimes import app_for

    token = scim_credential("entra").token
    return app_for(configured).test_client(), {"Authorization": f"Bearer {token}"}


def _error(r: Any, status: int, scim_type: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.mimetype == "application/scim+json"
    body = r.get_json()
    assert body["schemas"] == [ERROR] and body["status"] == str(status)
    if scim_type is not None:
        assert body.get("scimType") == scim_type, body
    return body  # type: ignore[no-any-return]


def _users(pg_conn: Any) -> int:
    return pg_conn.execute("SELECT count(*) FROM users").fetchone()[0]  # type: ignore[no-any-return]


def test_entra_ids_sequence_provisions_updates_and_deprovisions(scim, make_person,  # type: ignore[no-untyped-def]
                                                                pg_conn) -> None:
    from charter.actor import SYSTEM
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_team, set_member

    client, auth = scim
    # Entra first looks the user up by userName, then creates it.
    r = client.get('/scim/v2/Users?filter=userName+eq+"Jane.Doe%40contoso.com"', headers=auth)
    assert r.status_code == 200 and r.get_json()["totalResults"] == 0
    r = client.post("/scim/v2/Users", headers=auth, json={
        "schemas": [USER, "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
        "externalId": "6f1d9e3a-entra", "userName": "Jane.Doe@contoso.com", "active": True,
        "displayName": "Jane Doe",
        "emails": [{"primary": True, "type": "work", "value": "Jane.Doe@contoso.com"}],
        "meta": {"resourceType": "User"},
        "name": {"formatted": "Jane Doe", "familyName": "Doe", "givenName": "Jane"},
        "roles": []})
    assert r.status_code == 201, r.get_data(as_text=True)
    jane = r.get_json()
    assert (jane["userName"], jane["displayName"], jane["active"], jane["externalId"]) == (
        "jane.doe@contoso.com", "Jane Doe", True, "6f1d9e3a-entra")
    assert "emails" not in jane and "name" not in jane  # not kept: not answered
    assert r.headers["ETag"] == jane["meta"]["version"] == 'W/"1"'
    assert r.headers["Location"].endswith(f"/scim/v2/Users/{jane['id']}")
    r = client.get('/scim/v2/Users?filter=userName+eq+"JANE.DOE%40contoso.com"', headers=auth)
    assert [u["id"] for u in r.get_json()["Resources"]] == [jane["id"]]  # no case

    # The person works: a team, a key of their own.
    team = create_team(SYSTEM, name="ops", description="", entitlements={},
                       requests_per_day=None, default_data_class="internal")
    set_member(SYSTEM, team.id, jane["id"], "member")
    key = create_api_key(SYSTEM, jane["id"], name="laptop").token
    api = {"Authorization": f"Bearer {key}"}
    assert client.get("/api/v1/me", headers=api).status_code == 200

    # Entra's PATCH: capitalised op, string booleans.
    r = client.patch(f"/scim/v2/Users/{jane['id']}", headers=auth, json={
        "schemas": [PATCH], "Operations": [
            {"op": "Replace", "path": "displayName", "value": "Jane Q. Doe"}]})
    assert r.status_code == 200 and r.get_json()["displayName"] == "Jane Q. Doe"
    r = client.patch(f"/scim/v2/Users/{jane['id']}", headers=auth, json={
        "schemas": [PATCH], "Operations": [{"op": "Replace", "path": "active",
                                            "value": "False"}]})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["active"] is False
    # Access ended with the call: the key is refused on the very next request.
    r = client.get("/api/v1/me", headers=api)
    assert r.status_code == 401 and r.get_json()["error"]["code"] == "invalid_credentials"
    event = list_events(EventFilter(action="user.deprovision"))[-1]
    assert event.details["via"] == "scim" and event.details["teams_left"] == ["ops"]
    assert len(event.details["keys_revoked"]) == 1
    assert 0 <= event.details["seconds_since_request"] < 1  # the provider's call to commit
    assert event.actor == "provisioner:scim-entra"

    # Entra's reactivation: the account comes back with nothing it had.
    r = client.patch(f"/scim/v2/Users/{jane['id']}", headers=auth, json={
        "schemas": [PATCH], "Operations": [{"op": "Replace", "path": "active",
                                            "value": "True"}]})
    assert r.get_json()["active"] is True
    assert client.get("/api/v1/me", headers=api).status_code == 401  # the key stays revoked
    assert pg_conn.execute("SELECT count(*) FROM team_members WHERE user_id = %s",
                           (jane["id"],)).fetchone()[0] == 0

    # Entra's DELETE: gone for SCIM, the row and trail stay.
    r = client.delete(f"/scim/v2/Users/{jane['id']}", headers=auth)
    assert r.status_code == 204
    _error(client.get(f"/scim/v2/Users/{jane['id']}", headers=auth), 404)
    assert pg_conn.execute("SELECT active FROM users WHERE id = %s",
                           (jane["id"],)).fetchone()[0] is False
    actions = [e.action for e in list_events(EventFilter(target_id=jane["id"]))]
    assert actions == ["user.create", "user.update", "user.update", "user.deprovision",
                       "user.update", "user.reactivate", "user.deprovision",
                       "user.scim_delete"]
    assert verify_chain().ok

    # The offboarding evidence: the account, its keys, how and how fast access ended.
    auditor = make_person("auditor")
    r = client.get(f"/api/v1/exports/users/{jane['id']}/offboarding",
                   headers=auditor.headers)
    assert r.status_code == 200, r.get_data(as_text=True)
    pack = r.get_json()
    assert pack["format"] == "charter.offboarding-pack/1"
    assert (pack["person"]["username"], pack["person"]["source"]) == (
        "jane.doe@contoso.com", "scim")
    first = pack["access_ended"][0]
    assert first["via"] == "scim" and first["by"] == "provisioner:scim-entra"
    assert 0 <= first["seconds_from_call_to_last_credential_revoked"] < 1
    assert first["provider_call_at"] is not None and first["teams_left"] == ["ops"]
    assert pack["open_credentials"] == [] and pack["keys"][0]["revoked_by_deprovisioning"]
    trail = {e["seq"]: e["hash"] for e in pack["audit_trail"]}
    for seq, hash_ in trail.items():  # each as the log holds it
        assert pg_conn.execute("SELECT hash FROM audit_events WHERE seq = %s",
                               (seq,)).fetchone()[0] == hash_
    assert [e["action"] for e in pack["audit_trail"]][:2] == ["user.create",
                                                             "api_key.create"]
    assert client.get(f"/api/v1/exports/users/{jane['id']}/offboarding",
                      headers=make_person("user").headers).status_code == 403
    exported = list_events(EventFilter(action="export.offboarding", outcome="success"))[-1]
    assert exported.details["user_id"] == jane["id"]
    assert list_events(EventFilter(action="export.offboarding"))[-1].outcome == "denied"


def test_oktas_sequence_with_its_own_shapes(scim, pg_conn) -> None:  # type: ignore[no-untyped-def]
    client, auth = scim
    r = client.post("/scim/v2/Users", headers=auth, json={
        "schemas": [USER], "userName": "bob@example.com",
        "name": {"givenName": "Bob", "familyName": "Smith"},
        "emails": [{"primary": True, "value": "bob@example.com", "type": "work"}],
        "locale": "en-US", "externalId": "00u1abcdEFGH", "groups": [],
        "password": "t3mp-Passw0rd!", "active": True})
    assert r.status_code == 201, r.get_data(as_text=True)
    bob = r.get_json()
    assert bob["displayName"] == "Bob Smith" and "password" not in bob
    # Okta deactivates with a path-less replace.
    r = client.patch(f"/scim/v2/Users/{bob['id']}", headers=auth, json={
        "schemas": [PATCH], "Operations": [{"op": "replace", "value": {"active": False}}]})
    assert r.status_code == 200 and r.get_json()["active"] is False
    assert pg_conn.execute("SELECT deprovisioned_at IS NOT NULL FROM users WHERE id = %s",
                           (bob["id"],)).fetchone()[0] is True
    # ... and reactivates with a PUT of the whole user, If-Match on its version.
    put = {"schemas": [USER], "id": bob["id"], "userName": "bob@example.com",
           "displayName": "Bob Smith", "externalId": "00u1abcdEFGH", "active": True}
    stale = client.put(f"/scim/v2/Users/{bob['id']}", headers={**auth, "If-Match": 'W/"1"'},
                       json=put)
    _error(stale, 412)
    version = client.get(f"/scim/v2/Users/{bob['id']}", headers=auth).headers["ETag"]
    r = client.put(f"/scim/v2/Users/{bob['id']}", headers={**auth, "If-Match": version},
                   json=put)
    assert r.status_code == 200 and r.get_json()["active"] is True
    r = client.get('/scim/v2/Users?filter=externalId+eq+"00u1abcdEFGH"&attributes=userName',
                   headers=auth)
    found = r.get_json()["Resources"]
    assert [u.get("userName") for u in found] == ["bob@example.com"]
    assert "displayName" not in found[0]  # only what was asked for (and id, schemas)


def test_the_credential_opens_scim_only_and_scim_only_that_credential(scim, make_person) -> None:  # type: ignore[no-untyped-def]
    client, auth = scim
    r = client.get("/api/v1/me", headers=auth)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "scim_credential_only"
    r = client.post("/v1/chat/completions", headers=auth, json={"model": "m", "messages": []})
    assert r.status_code == 403
    assert r.get_json()["error"]["code"] == "scim_credential_only"  # in OpenAI's shape
    assert r.get_json()["error"]["type"] == "permission_error"
    admin = make_person("admin")
    body = _error(client.get("/scim/v2/Users", headers=admin.headers), 403)
    assert "identity provider's credential" in body["detail"]
    attempt = list_events(EventFilter(action="scim.access"))[-1]
    assert (attempt.actor, attempt.outcome) == (admin.actor.ref, "denied")
    r = client.get("/scim/v2/Users")
    _error(r, 401)
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    _error(client.get("/scim/v2/Users", headers={"Authorization": "Bearer chk_x_y"}), 401)
    _error(client.get("/scim/v2/Bulk", headers=auth), 404)


@pytest.mark.parametrize(("method", "path", "body", "status", "scim_type"), [
    ("post", "/scim/v2/Users", {"schemas": [USER], "userName": "x y z"}, 400, "invalidValue"),
    ("post", "/scim/v2/Users", {"schemas": [USER], "userName": "ok", "active": 5}, 400,
     "invalidValue"),
    ("post", "/scim/v2/Users", {"schemas": [USER]}, 400, "invalidValue"),
    ("post", "/scim/v2/Users", {"schemas": [USER], "userName": "ok", "isAdmin": True}, 400,
     "invalidValue"),  # an attribute no schema declares
    ("post", "/scim/v2/Users", {"schemas": ["urn:example:custom"], "userName": "ok"}, 400,
     "invalidValue"),
    ("post", "/scim/v2/Users", ["not", "an", "object"], 400, "invalidSyntax"),
    ("get", '/scim/v2/Users?filter=userName+eq+"a"+or+userName+pr', None, 400,
     "invalidFilter"),
    ("get", '/scim/v2/Users?filter=userName+eq+"a"+or+1+eq+1', None, 400, "invalidFilter"),
    ("get", "/scim/v2/Users?filter=" + "x" * 5000, None, 400, "invalidFilter"),
    ("get", '/scim/v2/Users?filter=password+eq+"x"', None, 400, "invalidFilter"),
    ("get", "/scim/v2/Users?count=many", None, 400, "invalidValue"),
    ("post", "/scim/v2/Users/.search", {"filter": 5}, 400, "invalidFilter"),
])
def test_bad_input_gets_a_scim_error_and_changes_nothing(scim, pg_conn, method, path, body,  # type: ignore[no-untyped-def]
                                                        status, scim_type) -> None:
    client, auth = scim
    before = _users(pg_conn)
    r = getattr(client, method)(path, headers=auth, json=body)
    _error(r, status, scim_type)
    assert _users(pg_conn) == before
    if method == "post" and path == "/scim/v2/Users":  # a refused change is audited
        refused = list_events(EventFilter(action="scim.refused"))[-1]
        assert (refused.outcome, refused.target_id) == ("denied", "POST /scim/v2/Users")
        assert refused.details["scim_type"] == scim_type
        assert refused.actor == "provisioner:scim-entra"


def test_a_patch_that_cannot_apply_changes_nothing(scim, pg_conn) -> None:  # type: ignore[no-untyped-def]
    client, auth = scim
    user = client.post("/scim/v2/Users", headers=auth, json={
        "schemas": [USER], "userName": "carol", "displayName": "Carol"}).get_json()
    for operations in ([{"op": "replace", "path": "nosuch.attr", "value": "x"}],
                       [{"op": "explode", "path": "displayName", "value": "x"}],
                       [{"op": "replace", "path": "displayName", "value": "Caro"},
                        {"op": "replace", "path": "userName", "value": "not valid!"}]):
        r = client.patch(f"/scim/v2/Users/{user['id']}", headers=auth,
                         json={"schemas": [PATCH], "Operations": operations})
        _error(r, 400)
        assert list_events(EventFilter(action="scim.refused"))[-1].target_id == (
            f"PATCH /scim/v2/Users/{user['id']}")
    got = client.get(f"/scim/v2/Users/{user['id']}", headers=auth).get_json()
    assert (got["displayName"], got["userName"], got["meta"]["version"]) == (
        "Carol", "carol", 'W/"1"')


GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"


@pytest.fixture
def mapped(configured) -> tuple[Any, dict[str, str]]:  # type: ignore[no-untyped-def]
    """SCIM with the groups mapped: charter-approvers -> role approver, charter-ops -> ops."""
    import dataclasses

    from charter.actor import SYSTEM
    from charter.identity.service import scim_credential
    from charter.identity.teams import create_team
    from tests.runtimes import app_for

    create_team(SYSTEM, name="ops", description="", entitlements={}, requests_per_day=None,
                default_data_class="internal")
    settings = dataclasses.replace(
        configured, oidc_role_map='{"charter-approvers": ["approver"]}',
        oidc_team_map='{"charter-ops": "ops"}')
    token = scim_credential("okta").token
    return app_for(settings).test_client(), {"Authorization": f"Bearer {token}"}


def _roles_and_teams(pg_conn: Any, user_id: str) -> tuple[list[str], list[tuple[str, str]]]:
    roles = [r[0] for r in pg_conn.execute(
        "SELECT role FROM user_roles WHERE user_id = %s ORDER BY role", (user_id,))]
    teams = [(r[0], r[1]) for r in pg_conn.execute(
        "SELECT t.name, m.source FROM team_members m JOIN teams t ON t.id = m.team_id "
        "WHERE m.user_id = %s ORDER BY t.name", (user_id,))]
    return roles, teams


def test_group_pushes_map_to_roles_and_teams_in_each_providers_shape(mapped, pg_conn) -> None:  # type: ignore[no-untyped-def]
    client, auth = mapped
    dan = client.post("/scim/v2/Users", headers=auth, json={
        "schemas": [USER], "userName": "dan@example.com", "displayName": "Dan"}).get_json()
    ops = client.post("/scim/v2/Groups", headers=auth, json={
        "schemas": [GROUP], "displayName": "charter-ops", "members": []}).get_json()
    approvers = client.post("/scim/v2/Groups", headers=auth, json={
        "schemas": [GROUP], "displayName": "charter-approvers"}).get_json()
    assert _roles_and_teams(pg_conn, dan["id"]) == ([], [])

    # Okta adds a member with its display name; Entra with a capitalised op and no display.
    r = client.patch(f"/scim/v2/Groups/{ops['id']}", headers=auth, json={
        "schemas": [PATCH], "Operations": [{"op": "add", "path": "members", "value": [
            {"value": dan["id"], "display": "dan@example.com"}]}]})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert [m["value"] for m in r.get_json()["members"]] == [dan["id"]]
    r = client.patch(f"/scim/v2/Groups/{approvers['id']}", headers=auth, json={
        "schemas": [PATCH], "Operations": [{"op": "Add", "path": "members", "value": [
            {"value": dan["id"]}]}]})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert _roles_and_teams(pg_conn, dan["id"]) == (["approver"], [("ops", "idp")])
    synced = list_events(EventFilter(action="user.roles_synced"))[-1]
    assert synced.details["after"] == ["approver"] and synced.details["via"] == "scim"

    # Entra removes with the member as the value; Okta by a filter on the path.
    r = client.patch(f"/scim/v2/Groups/{approvers['id']}", headers=auth, json={
        "schemas": [PATCH], "Operations": [{"op": "Remove", "path": "members", "value": [
            {"value": dan["id"]}]}]})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert "members" not in r.get_json()
    r = client.patch(f"/scim/v2/Groups/{ops['id']}", headers=auth, json={
        "schemas": [PATCH], "Operations": [
            {"op": "remove", "path": f'members[value eq "{dan["id"]}"]'}]})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert _roles_and_teams(pg_conn, dan["id"]) == (["user"], [])

    # A member that is no user here refuses the whole change.
    before = client.get(f"/scim/v2/Groups/{ops['id']}", headers=auth).get_json()
    r = client.patch(f"/scim/v2/Groups/{ops['id']}", headers=auth, json={
        "schemas": [PATCH], "Operations": [{"op": "add", "path": "members", "value": [
            {"value": dan["id"]}, {"value": "no-such-user"}]}]})
    _error(r, 400, "invalidValue")
    assert client.get(f"/scim/v2/Groups/{ops['id']}", headers=auth).get_json() == before

    # A deactivated member gets nothing from its groups; deleting a group takes back what
    # it gave.
    client.patch(f"/scim/v2/Groups/{ops['id']}", headers=auth, json={
        "schemas": [PATCH], "Operations": [{"op": "add", "path": "members",
                                            "value": [{"value": dan["id"]}]}]})
    assert _roles_and_teams(pg_conn, dan["id"])[1] == [("ops", "idp")]
    r = client.delete(f"/scim/v2/Groups/{ops['id']}", headers=auth)
    assert r.status_code == 204
    assert _roles_and_teams(pg_conn, dan["id"])[1] == []
    client.patch(f"/scim/v2/Users/{dan['id']}", headers=auth, json={
        "schemas": [PATCH], "Operations": [{"op": "replace", "path": "active",
                                            "value": False}]})
    client.patch(f"/scim/v2/Groups/{approvers['id']}", headers=auth, json={
        "schemas": [PATCH], "Operations": [{"op": "add", "path": "members",
                                            "value": [{"value": dan["id"]}]}]})
    assert _roles_and_teams(pg_conn, dan["id"]) == ([], [])
    r = client.get('/scim/v2/Groups?filter=displayName+eq+"charter-approvers"', headers=auth)
    assert [g["id"] for g in r.get_json()["Resources"]] == [approvers["id"]]
    assert verify_chain().ok


def test_a_provisioned_person_signing_in_uses_the_same_account(scim, make_person) -> None:  # type: ignore[no-untyped-def]
    """The provider provisions over SCIM, then the person signs in with SSO for the first
    time: the SCIM account whose externalId is the token's `oid` (or `sub`) is linked to
    the subject, not duplicated. A user name or e-mail claim never links (a person may set
    those for themselves at some providers); a deactivated account stays closed."""
    from charter.errors import UnauthenticatedError
    from charter.identity.sso import provision
    from charter.settings import Settings

    client, auth = scim
    erin = client.post("/scim/v2/Users", headers=auth, json={
        "schemas": [USER], "userName": "Erin@Contoso.com", "displayName": "Erin",
        "externalId": "2c1d-oid-erin"}).get_json()
    settings = Settings.from_env({}, secret_key="x" * 40)
    # Mallory claims Erin's name and address: a new account, not Erin's.
    mallory = provision(settings, {"iss": "https://login.example/v2.0", "sub": "mallory",
                                   "oid": "9f9f-oid-mallory",
                                   "preferred_username": "erin@contoso.com",
                                   "email": "erin@contoso.com"}, via="console")
    assert mallory.user_id != erin["id"]
    claims = {"iss": "https://login.example/v2.0", "sub": "erin-sub", "oid": "2c1d-oid-erin",
              "preferred_username": "erin@contoso.com", "name": "Erin"}
    actor = provision(settings, claims, via="console")
    assert actor.user_id == erin["id"]
    assert provision(settings, claims, via="api").user_id == erin["id"]  # by subject now
    linked = list_events(EventFilter(action="user.linked"))[-1]
    assert linked.target_id == erin["id"] and linked.details["matched"] == "externalId"

    client.post("/scim/v2/Users", headers=auth, json={
        "schemas": [USER], "userName": "frank@contoso.com", "externalId": "oid-frank",
        "active": False})
    with pytest.raises(UnauthenticatedError) as closed:
        provision(settings, {**claims, "sub": "frank-sub", "oid": "oid-frank"},
                  via="console")
    assert closed.value.code == "account_disabled"


def test_scim_never_reaches_a_local_account(scim, make_person, pg_conn) -> None:  # type: ignore[no-untyped-def]
    """A local account (an admin's, a break-glass admin) is not the provider's: SCIM does
    not list, change, deactivate or group it."""
    client, auth = scim
    admin = make_person("admin")
    uid = admin.actor.user_id
    r = client.get(f'/scim/v2/Users?filter=userName+eq+"{admin.actor.username}"',
                   headers=auth)
    assert r.get_json()["totalResults"] == 0
    _error(client.get(f"/scim/v2/Users/{uid}", headers=auth), 404)
    _error(client.patch(f"/scim/v2/Users/{uid}", headers=auth, json={
        "schemas": [PATCH], "Operations": [{"op": "replace", "path": "active",
                                            "value": False}]}), 404)
    _error(client.delete(f"/scim/v2/Users/{uid}", headers=auth), 404)
    _error(client.post("/scim/v2/Groups", headers=auth, json={
        "schemas": [GROUP], "displayName": "g", "members": [{"value": uid}]}), 400)
    row = pg_conn.execute("SELECT active FROM users WHERE id = %s", (uid,)).fetchone()
    assert row[0] is True


def test_an_omitted_active_changes_nothing(scim) -> None:  # type: ignore[no-untyped-def]
    client, auth = scim
    gail = client.post("/scim/v2/Users", headers=auth, json={
        "schemas": [USER], "userName": "gail", "active": False}).get_json()
    r = client.put(f"/scim/v2/Users/{gail['id']}", headers=auth, json={
        "schemas": [USER], "userName": "gail", "displayName": "Gail"})
    assert r.status_code == 200 and r.get_json()["active"] is False
    r = client.patch(f"/scim/v2/Users/{gail['id']}", headers=auth, json={
        "schemas": [PATCH], "Operations": [{"op": "remove", "path": "active"}]})
    assert r.get_json()["active"] is False  # refused or unchanged: never reopened
