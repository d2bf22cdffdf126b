"""Approvals past their expires_at: the periodic expiry moves versions to expired, audited."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from structlog.testing import capture_logs

from charter.actor import SYSTEM
from charter.audit.service import EventFilter, head, list_events, verify_chain
from charter.db import utcnow
from charter.registry import service
from charter.registry.schemas import RequiredReason
from tests.integration.test_registry_api import CONDITIONS, VERSION
from tests.runtimes import with_current_runtime


@pytest.fixture
def people(make_person):  # type: ignore[no-untyped-def]
    return {"steward": make_person("steward"), "approver": make_person("approver"),
            "user": make_person("user")}


@pytest.fixture
def make_approved(client, people):  # type: ignore[no-untyped-def]
    """Approved versions of one model, each with the expiry it is given."""
    steward, approver = people["steward"], people["approver"]
    model = client.post("/api/v1/models", headers=steward.headers, json={
        "name": "TinyLlama", "publisher": "TinyLlama",
        "source_repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}).get_json()

    def make(label: str, expires_at: str) -> dict:
        r = client.post(f"/api/v1/models/{model['id']}/versions", headers=steward.headers,
                        json={**VERSION, "label": label})
        assert r.status_code == 201, r.get_json()
        vid = r.get_json()["id"]
        r = client.post(f"/api/v1/versions/{vid}/submit", headers=steward.headers, json={})
        assert r.status_code == 200, r.get_json()
        r = client.post(f"/api/v1/versions/{vid}/approve", headers=approver.headers,
                        json={**CONDITIONS, "expires_at": expires_at})
        assert r.status_code == 200 and r.get_json()["state"] == "approved", r.get_json()
        return r.get_json()

    return make


def _retire(client, approver, version: dict, action: str) -> None:  # type: ignore[no-untyped-def]
    r = client.post(f"/api/v1/versions/{version['id']}/{action}", headers=approver.headers,
                    json={"reason": f"{action} for the test"})
    assert r.status_code == 200, r.get_json()


def _state(client, user, version_id: str) -> str:  # type: ignore[no-untyped-def]
    return client.get(f"/api/v1/versions/{version_id}", headers=user.headers).get_json()["state"]


def test_versions_past_their_expiry_are_expired_once_and_audited(  # type: ignore[no-untyped-def]
        client, people, make_approved) -> None:
    approver, user = people["approver"], people["user"]
    soon = utcnow() + timedelta(days=1)
    due = make_approved("1.0", soon.isoformat())
    later = make_approved("1.1", (soon + timedelta(days=30)).isoformat())
    deprecated = make_approved("1.2", soon.isoformat())
    _retire(client, approver, deprecated, "deprecate")
    revoked = make_approved("1.3", soon.isoformat())
    _retire(client, approver, revoked, "revoke")

    # Nothing has run out yet.
    assert service.expire_approvals() == []
    assert list_events(EventFilter(action="version.expire")) == []

    # expires_at <= now expires: the dispatch policy denies from that instant on too.
    assert service.expire_approvals(soon) == [due["id"], deprecated["id"]]

    assert _state(client, user, due["id"]) == "expired"
    assert _state(client, user, deprecated["id"]) == "expired"
    assert _state(client, user, later["id"]) == "approved"
    assert _state(client, user, revoked["id"]) == "revoked"
    listed = client.get("/api/v1/versions?state=expired", headers=user.headers).get_json()
    assert sorted(v["id"] for v in listed) == sorted([due["id"], deprecated["id"]])
    got = client.get(f"/api/v1/versions/{due['id']}", headers=user.headers).get_json()
    assert got["row_version"] == due["row_version"] + 1
    assert got["state_reason"] == f"the approval expired at {soon.isoformat()}"

    events = list_events(EventFilter(action="version.expire"))
    assert [(e.target_type, e.target_id, e.actor, e.outcome) for e in events] == [
        ("model_version", due["id"], SYSTEM.ref, "success"),
        ("model_version", deprecated["id"], SYSTEM.ref, "success"),
    ]
    assert events[0].details == {
        "model": "TinyLlama", "label": "1.0", "from": "approved", "to": "expired",
        "reason": f"the approval expired at {soon.isoformat()}",
        "decision_id": due["decisions"][0]["id"], "expires_at": soon.isoformat(),
    }
    assert events[1].details["from"] == "deprecated"
    assert events[1].details["decision_id"] == deprecated["decisions"][0]["id"]
    assert events[0].request_id is None  # the periodic job, not an HTTP request

    # Idempotent: a second run, even much later, changes and writes nothing.
    before = head()
    assert service.expire_approvals(soon + timedelta(days=1)) == []
    assert head() == before
    assert verify_chain().ok


def test_an_expired_version_is_final(client, people, make_approved) -> None:  # type: ignore[no-untyped-def]
    soon = utcnow() + timedelta(days=1)
    v = make_approved("1.0", soon.isoformat())
    assert service.expire_approvals(soon + timedelta(seconds=1)) == [v["id"]]
    for action in ("deprecate", "revoke"):
        r = client.post(f"/api/v1/versions/{v['id']}/{action}",
                        headers=people["approver"].headers, json={"reason": "too late"})
        err = r.get_json()["error"]
        assert r.status_code == 409 and err["code"] == "illegal_transition"
        assert err["details"] == {"state": "expired", "action": action, "allowed_actions": []}


def test_system_actions_are_not_offered_to_callers(client, people, make_approved) -> None:  # type: ignore[no-untyped-def]
    v = make_approved("1.0", (utcnow() + timedelta(days=1)).isoformat())
    r = client.post(f"/api/v1/versions/{v['id']}/submit", headers=people["steward"].headers,
                    json={})
    err = r.get_json()["error"]
    assert err["code"] == "illegal_transition"
    assert err["details"]["allowed_actions"] == ["deprecate", "revoke"]


def test_a_concurrent_human_change_wins(  # type: ignore[no-untyped-def]
        client, people, make_approved, monkeypatch) -> None:
    soon = utcnow() + timedelta(days=1)
    raced = make_approved("1.0", soon.isoformat())
    other = make_approved("1.1", soon.isoformat())
    original = service._transition
    revoked: list[object] = []

    def revoke(version_id: str) -> None:
        try:
            revoked.append(service.revoke_version(
                people["approver"].actor, version_id, RequiredReason(reason="pulled")).state)
        except Exception as exc:  # noqa: BLE001 - handed to the test thread below
            revoked.append(exc)

    def revoke_meanwhile(session, actor, version, action, reason, extra=None):  # type: ignore[no-untyped-def]
        if action == "expire" and version.id == raced["id"]:
            # A person revokes and commits (in a thread: its own unit of work) after the
            # expiry read the version and before it writes.
            human = threading.Thread(target=with_current_runtime(revoke),
                                     args=(version.id,))
            human.start()
            human.join(timeout=30)
            assert revoked == ["revoked"]
        original(session, actor, version, action, reason, extra)

    monkeypatch.setattr(service, "_transition", revoke_meanwhile)
    with capture_logs() as logs:
        assert service.expire_approvals(soon) == [other["id"]]
    assert [(e["log_level"], e["version_id"]) for e in logs] == [("warning", raced["id"])]
    assert "changed meanwhile" in logs[0]["event"]

    user = people["user"]
    assert _state(client, user, raced["id"]) == "revoked"
    assert _state(client, user, other["id"]) == "expired"
    assert [e.target_id for e in list_events(EventFilter(action="version.expire"))] == [
        other["id"]]
    revokes = list_events(EventFilter(action="version.revoke"))
    assert [(e.target_id, e.actor, e.details["reason"]) for e in revokes] == [
        (raced["id"], people["approver"].actor.ref, "pulled")]
    # The revoked one is not tried again; nothing is left to expire.
    monkeypatch.setattr(service, "_transition", original)
    assert service.expire_approvals(soon) == []
    assert verify_chain().ok


def test_now_must_carry_a_timezone(configured) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="timezone"):
        service.expire_approvals(utcnow().replace(tzinfo=None))
