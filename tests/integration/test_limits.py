"""Limits at the gateway: refused in the caller's protocol with Retry-After and the limit's
name, audited, counted; shared by replicas through one Redis; and what happens when that
Redis is away (fail closed by default)."""

from __future__ import annotations

import pytest

from charter.actor import SYSTEM
from charter.audit.service import EventFilter, list_events
from charter.identity.service import set_api_key_limits
from charter.identity.teams import get_team, update_team
from tests.batch_support import make_world
from tests.processes import free_port
from tests.runtimes import app_for, flush_outcomes

CHAT = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
TGI = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}




def _limit_team(team_id: str, **limits: int) -> None:
    team = get_team(SYSTEM, team_id)
    update_team(SYSTEM, team_id, {"limits": limits}, row_version=team.row_version)


def test_requests_per_minute_answer_429_in_each_protocol_and_are_audited(
        configured, make_person, redis_url) -> None:  # type: ignore[no-untyped-def]
    world = make_world(configured, make_person, limits_redis_url=redis_url)
    try:
        _limit_team(world.team_id, requests_per_minute=2)
        client = app_for(world.settings).test_client()
        for _ in range(2):
            r = client.post("/v1/chat/completions", headers=world.headers, json=CHAT)
            assert r.status_code == 200, r.get_data(as_text=True)[:300]
        r = client.post("/v1/chat/completions", headers=world.headers, json=CHAT)
        assert r.status_code == 429
        error = r.get_json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "limit_exceeded" and error["type"] == "rate_limit_error"
        assert "team t has reached its limit team.requests_per_minute (2)" in error["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= 30
        r = client.post("/tgi/m/generate", headers=world.headers, json=TGI)
        assert r.status_code == 429 and r.get_json()["error_type"] == "limit_exceeded"
        assert "team.requests_per_minute" in r.get_json()["error"]
        assert int(r.headers["Retry-After"]) >= 1
        assert sum(world.node.hits.values()) == 2  # the refused never reached the node
        refused = list_events(EventFilter(action="dispatch.refused"))
        assert [e.details["code"] for e in refused] == ["limit_exceeded"] * 2
        # The policy works while Redis answers, but a refused request commits no decision.
        decided = list_events(EventFilter(action="policy.decide", target_type="deployment"))
        assert len(decided) == 2
        assert refused[-1].details["limit"] == "team.requests_per_minute"
        assert refused[-1].details["limit_value"] == 2 and refused[-1].outcome == "denied"
        key_id = world.key.split("_")[1]
        assert refused[-1].details["key_id"] == key_id  # which key, never its secret
        assert flush_outcomes()
        outcomes = list_events(EventFilter(action="dispatch.outcome"))
        assert [e.details["key_id"] for e in outcomes] == [key_id] * 2
        metrics = client.get("/metrics").get_data(as_text=True)
        assert 'charter_limit_refusals_total{limit="team.requests_per_minute"} 2.0' in metrics
    finally:
        world.node.stop()


def test_a_keys_token_budget_counts_what_the_node_reported(
        configured, make_person, redis_url) -> None:  # type: ignore[no-untyped-def]
    """The node reports 5 tokens an answer; with a budget of 8 a day the second request
    still goes (5 used), the third does not (10 used), until tomorrow."""
    world = make_world(configured, make_person, limits_redis_url=redis_url)
    try:
        key_id = world.key.split("_")[1]
        set_api_key_limits(SYSTEM, key_id, {"tokens_per_day": 8})
        client = app_for(world.settings).test_client()
        for _ in range(2):
            r = client.post("/v1/chat/completions", headers=world.headers, json=CHAT)
            assert r.status_code == 200, r.get_data(as_text=True)[:300]
        r = client.post("/v1/chat/completions", headers=world.headers, json=CHAT)
        assert r.status_code == 429
        assert "key.tokens_per_day (8)" in r.get_json()["error"]["message"]
        assert int(r.headers["Retry-After"]) <= 86_400
        assert flush_outcomes()
        changed = list_events(EventFilter(action="api_key.set_limits"))
        assert changed[-1].details["after"] == {"tokens_per_day": 8}
    finally:
        world.node.stop()


def test_a_limit_holds_across_replicas_sharing_one_redis(
        configured, make_person, redis_url) -> None:  # type: ignore[no-untyped-def]
    """Two apps with runtimes of their own (as two pods would be), asked in turn."""
    world = make_world(configured, make_person, limits_redis_url=redis_url)
    try:
        _limit_team(world.team_id, requests_per_minute=3)
        pods = [app_for(world.settings).test_client() for _ in range(2)]
        codes = [pods[i % 2].post("/v1/chat/completions", headers=world.headers,
                                  json=CHAT).status_code for i in range(6)]
        assert codes == [200, 200, 200, 429, 429, 429]
    finally:
        world.node.stop()


@pytest.mark.parametrize("mode", ["refuse", "allow"])
def test_a_redis_that_is_away(configured, make_person, mode) -> None:  # type: ignore[no-untyped-def]
    """Refused by default (fail closed: 503 `limits_unavailable`, audited); with `allow`,
    served unchecked, and the audit log says so once."""
    world = make_world(configured, make_person,
                       limits_redis_url=f"redis://127.0.0.1:{free_port()}/0",
                       limits_timeout_s=0.2, limits_unavailable=mode)
    try:
        _limit_team(world.team_id, requests_per_minute=100)
        client = app_for(world.settings).test_client()
        codes = [client.post("/v1/chat/completions", headers=world.headers,
                             json=CHAT).status_code for _ in range(2)]
        metrics = client.get("/metrics").get_data(as_text=True)
        assert f'charter_limits_unavailable_total{{action="{mode}"}} 2.0' in metrics
        if mode == "refuse":
            assert codes == [503, 503] and sum(world.node.hits.values()) == 0
            r = client.post("/v1/chat/completions", headers=world.headers, json=CHAT)
            assert r.get_json()["error"]["code"] == "limits_unavailable"
            assert r.headers["Retry-After"] == "1"
            refused = list_events(EventFilter(action="dispatch.refused"))
            assert {e.details["code"] for e in refused} == {"limits_unavailable"}
        else:
            assert codes == [200, 200] and sum(world.node.hits.values()) == 2
            assert flush_outcomes()
            said = list_events(EventFilter(action="limits.unavailable"))
            assert len(said) == 1 and said[0].details["action"] == "allow"
            assert said[0].outcome == "failure"
    finally:
        world.node.stop()


def test_limits_are_set_through_the_api_and_checked(configured, make_person, client) -> None:  # type: ignore[no-untyped-def]
    admin = make_person("admin")
    r = client.post("/api/v1/teams", headers=admin.headers, json={
        "name": "capped", "limits": {"requests_per_minute": 60, "tokens_per_month": 10**6}})
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["limits"] == {"requests_per_minute": 60, "tokens_per_month": 10**6}
    team = r.get_json()
    for bad in ({"requests_per_minute": 0}, {"tokens_per_day": -1}, {"per_hour": 5},
                {"concurrent_streams": "2"}):
        r = client.patch(f"/api/v1/teams/{team['id']}", headers=admin.headers,
                         json={"row_version": team["row_version"], "limits": bad})
        assert r.status_code == 422, (bad, r.get_json())
        assert r.get_json()["error"]["code"] == "validation_failed"
    r = client.patch(f"/api/v1/teams/{team['id']}", headers=admin.headers,
                     json={"row_version": team["row_version"], "limits": None})
    assert r.status_code == 200 and r.get_json()["limits"] is None
    # A person cannot lift a limit put on their own key.
    person = make_person("user")
    key_id = person.token.split("_")[1]
    r = client.put(f"/api/v1/api-keys/{key_id}/limits", headers=person.headers,
                   json={"limits": {"requests_per_minute": 5}})
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    r = client.put(f"/api/v1/api-keys/{key_id}/limits", headers=admin.headers,
                   json={"limits": {"requests_per_minute": 5}})
    assert r.status_code == 200 and r.get_json()["limits"] == {"requests_per_minute": 5}


def test_a_request_the_policy_refuses_after_its_limits_admitted_it_gives_its_lease_back(
        configured, make_person, redis_url) -> None:  # type: ignore[no-untyped-def]
    """One concurrent stream: a stream the policy refuses (a purpose not approved) must
    not keep the place, and a limit refusal outranks the policy's."""
    world = make_world(configured, make_person, limits_redis_url=redis_url)
    try:
        _limit_team(world.team_id, concurrent_streams=1)
        client = app_for(world.settings).test_client()
        stream = {**CHAT, "stream": True}
        for _ in range(3):
            r = client.post("/v1/chat/completions", json=stream,
                            headers={**world.headers, "X-Charter-Purpose": "marketing"})
            assert r.status_code == 403, r.get_data(as_text=True)[:300]
        r = client.post("/v1/chat/completions", headers=world.headers, json=stream)
        assert r.status_code == 200
        r.get_data()  # read to its end: the lease goes back with its outcome
        r = client.post("/v1/chat/completions", headers=world.headers, json=stream)
        assert r.status_code == 200, r.get_data(as_text=True)[:300]
        r.get_data()
    finally:
        world.node.stop()
