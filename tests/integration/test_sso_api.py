"""The API with SSO on: the IdP's JWT access tokens authenticate, provision and map roles."""

from __future__ import annotations

import dataclasses
import json

import pytest
from joserfc.jwk import RSAKey

from charter.actor import SYSTEM
from charter.audit.service import EventFilter, list_events
from charter.identity.teams import caller_context, create_team
from tests.integration.test_jwt import AUDIENCE, IdP, claims_for, mint


@pytest.fixture
def sso(configured):  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    idp = IdP()
    idp.serve_keys(key)
    settings = dataclasses.replace(
        configured, oidc_issuer=idp.issuer, oidc_audience=AUDIENCE,
        public_url="https://charter.test",
        oidc_role_map=json.dumps({"ai-approvers": ["approver"], "ai-auditors": ["auditor"]}),
        oidc_team_map=json.dumps({"helpdesk-devs": "helpdesk"}))
    create_team(SYSTEM, name="helpdesk", description="", entitlements={"models": ["*"]},
                requests_per_day=None, default_data_class="internal")
    yield app_for(settings).test_client(), idp, key
    idp.close()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_jwt_provisions_the_user_and_maps_groups_each_request(sso) -> None:  # type: ignore[no-untyped-def]
    client, idp, key = sso
    claims = claims_for(idp.issuer, sub="u-1", preferred_username="Ada.Lovelace",
                        groups=["ai-approvers", "helpdesk-devs"])
    r = client.get("/api/v1/me", headers=_bearer(mint(key, claims)))
    assert r.status_code == 200, r.get_json()
    me = r.get_json()
    assert me["username"] == "ada.lovelace" and me["roles"] == ["approver"]
    assert me["external_issuer"] == idp.issuer
    teams = client.get("/api/v1/teams", headers=_bearer(mint(key, claims))).get_json()
    assert [t["name"] for t in teams] == ["helpdesk"]
    # The IdP moves the user to auditors: the very next request has the new role.
    claims = {**claims, "groups": ["ai-auditors"]}
    me = client.get("/api/v1/me", headers=_bearer(mint(key, claims))).get_json()
    assert me["roles"] == ["auditor"] and me["id"] == r.get_json()["id"]
    assert list(caller_context(me["id"]).teams) == []  # the IdP-granted membership went too
    synced = list_events(EventFilter(action="user.roles_synced"))
    assert [e.details["after"] for e in synced] == [["approver"], ["auditor"]]
    assert [e.action for e in list_events(EventFilter(action="user.provision"))] == [
        "user.provision"]


def test_bad_tokens_are_refused_and_audited_without_the_token(sso) -> None:  # type: ignore[no-untyped-def]
    client, idp, key = sso
    expired = mint(key, claims_for(idp.issuer, exp=1, iat=0, nbf=0))
    wrong_aud = mint(key, claims_for(idp.issuer, aud="someone-else"))
    for token, code in ((expired, "token_expired"), (wrong_aud, "audience_invalid"),
                        ("not.a.jwt", "token_malformed")):
        r = client.get("/api/v1/me", headers=_bearer(token))
        assert r.status_code == 401 and r.get_json()["error"]["code"] == code
    failed = list_events(EventFilter(action="auth.failed"))
    assert [e.details["code"] for e in failed] == ["token_expired", "audience_invalid",
                                                   "token_malformed"]
    for event in failed:
        assert event.details["method"] == "jwt"
        assert expired.split(".")[1] not in json.dumps(event.details)
