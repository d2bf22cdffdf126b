"""What a refused caller is told: a reason a person understands, in the caller's protocol."""

from __future__ import annotations

from charter.audit.service import EventFilter, list_events
from tests.batch_support import make_world

CHAT = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def test_a_key_of_someone_in_no_team_is_told_why(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    try:
        client = app_for(world.settings).test_client()
        loner = make_person("user")  # a person with a key, in no team
        r = client.post("/v1/chat/completions", headers=loner.headers, json=CHAT)
        assert r.status_code == 403, r.get_data(as_text=True)[:300]
        error = r.get_json()["error"]
        assert "belongs to no team" in error["message"]
        assert "null" not in error["message"] and "None" not in error["message"]
        assert sum(world.node.hits.values()) == 0  # nothing reached the node
        decided = list_events(EventFilter(action="policy.decide", limit=100))
        assert any("caller_without_team" in str(e.details) for e in decided)
    finally:
        world.node.stop()


def test_labels_are_folded_to_one_form_or_refused(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    """`Internal` is `internal` to the policy; a label with no canonical form (a dotted
    capital I, a space) is a 400 in OpenAI's error shape, decided before any policy."""
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    try:
        client = app_for(world.settings).test_client()
        r = client.post("/v1/chat/completions", json=CHAT, headers={
            **world.headers, "X-Charter-Data-Class": "INTERNAL", "X-Charter-Purpose": "Assistant"})
        assert r.status_code == 200, r.get_data(as_text=True)[:300]
        decided = list_events(EventFilter(action="policy.decide", limit=100))[-1]
        assert decided.outcome == "success" and decided.details["allow"] is True, decided
        before = len(list_events(EventFilter(action="policy.decide", limit=1000)))
        for bad in ("\u0130nternal", "in ternal", "x" * 51, "-internal"):
            r = client.post("/v1/chat/completions", json=CHAT, headers={
                **world.headers, "X-Charter-Data-Class": bad.encode().decode("latin-1")})
            assert r.status_code == 400, (bad, r.get_data(as_text=True)[:300])
            error = r.get_json()["error"]
            assert "X-Charter-Data-Class must be an identifier" in error["message"], error
        assert len(list_events(EventFilter(action="policy.decide", limit=1000))) == before
    finally:
        world.node.stop()


def test_errors_keep_the_callers_protocol_off_the_known_routes(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    """An OpenAI client that calls a route Charter does not have, or a TGI client that
    uses the wrong method, hears it in its own protocol, not in Charter's /api shape."""
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    try:
        client = app_for(world.settings).test_client()
        r = client.post("/v1/moderations", headers=world.headers, json={"input": "x"})
        assert r.status_code == 404
        error = r.get_json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert (error["type"], error["code"]) == ("not_found_error", "not_found")
        assert "POST /v1/moderations" in error["message"]
        r = client.get("/generate", headers=world.headers)
        assert r.status_code == 405 and set(r.get_json()) == {"error", "error_type"}
        r = client.post("/v1/chat/completions", json=CHAT,
                        headers={"Authorization": "Bearer chk_0123456789abcdef_nope"})
        assert r.status_code == 401
        assert r.get_json()["error"]["code"] == "invalid_credentials"
        assert r.get_json()["error"]["type"] == "authentication_error"
        r = client.get("/api/v1/nothing-here", headers=world.headers)  # Charter's own shape
        assert r.status_code == 404 and set(r.get_json()["error"]) == {
            "code", "message", "details", "request_id"}
    finally:
        world.node.stop()


def test_a_deprecated_version_says_so_and_when_it_ends(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from email.utils import parsedate_to_datetime

    from charter.actor import SYSTEM
    from charter.registry import service as registry
    from charter.registry.schemas import RequiredReason
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    try:
        client = app_for(world.settings).test_client()
        r = client.post("/v1/chat/completions", headers=world.headers, json=CHAT)
        assert r.status_code == 200 and "Deprecation" not in r.headers
        registry.deprecate_version(SYSTEM, world.version_id,
                                   RequiredReason(reason="a newer version is approved"))
        version = registry.get_version(world.version_id)
        r = client.post("/v1/chat/completions", headers=world.headers, json=CHAT)
        assert r.status_code == 200
        assert r.headers["Deprecation"] == f"@{int(version.state_changed_at.timestamp())}"
        approval = [d for d in version.decisions if d.decision == "approved"][-1]
        assert approval.expires_at is not None
        assert parsedate_to_datetime(r.headers["Sunset"]) == approval.expires_at.replace(
            microsecond=0)
    finally:
        world.node.stop()


def test_the_overview_counts_every_refusal_the_log_holds(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    """A policy denial writes its decisions and one `dispatch.refused`, like every other
    refusal; the console's counts are the log's."""
    from datetime import timedelta

    from charter.audit.activity import dispatch_activity
    from charter.db import utcnow
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    try:
        since = utcnow() - timedelta(minutes=1)
        client = app_for(world.settings).test_client()
        for purpose in ("marketing", "hr", "assistant"):
            client.post("/v1/chat/completions", json=CHAT,
                        headers={**world.headers, "X-Charter-Purpose": purpose})
        refused = list_events(EventFilter(action="dispatch.refused"))
        denied = [e for e in list_events(EventFilter(action="policy.decide"))
                  if e.outcome == "denied"]
        assert len(refused) == len(denied) == 2
        assert {e.details["code"] for e in refused} == {"policy_denied"}
        activity = dispatch_activity(since)
        assert activity.by_model["m"].denied == 2
    finally:
        world.node.stop()
