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
