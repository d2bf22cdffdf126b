"""The registry over HTTP against PostgreSQL: lifecycle, four-eyes, conflicts, bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from charter.audit.service import EventFilter, list_events, verify_chain

FUTURE = (datetime.now(UTC) + timedelta(days=90)).isoformat()
CONDITIONS = {
    "allowed_regions": ["eu-west"],
    "allowed_data_classes": ["internal"],
    "allowed_purposes": ["assistant"],
    "expires_at": FUTURE,
    "reason": "reviewed",
}
VERSION = {
    "label": "1.0",
    "source_revision": "fe8a4ea1ffedaf415f4da2f062534de366a451e6",
    "weight_format": "safetensors",
    "files": [{"path": "model.safetensors", "size": 10, "sha256": "a" * 64}],
    "architecture": "LlamaForCausalLM",
    "parameter_count": 1100048384,
    "context_length": 2048,
    "license_declared": "apache-2.0",
    "license_card": "apache-2.0",
    "datasets": ["cerebras/SlimPajama-627B"],
    "storage_region": "eu-west",
    "hosting_regions": ["eu-west", "eu-central"],
}


@pytest.fixture
def people(make_person):  # type: ignore[no-untyped-def]
    return {
        "steward": make_person("steward"),
        "steward2": make_person("steward", "approver"),
        "approver": make_person("approver"),
        "auditor": make_person("auditor"),
        "user": make_person("user"),
    }


def _error(resp, status: int, code: str) -> dict:  # type: ignore[no-untyped-def]
    assert resp.status_code == status, resp.get_json()
    body = resp.get_json()
    assert body["error"]["code"] == code, body
    assert set(body["error"]) == {"code", "message", "details", "request_id"}
    assert body["error"]["request_id"] == resp.headers["X-Request-Id"]
    return body["error"]


def _draft(client, steward) -> dict:  # type: ignore[no-untyped-def]
    r = client.post("/api/v1/models", headers=steward.headers, json={
        "name": "TinyLlama", "publisher": "TinyLlama",
        "source_repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"})
    assert r.status_code == 201, r.get_json()
    model = r.get_json()
    r = client.post(f"/api/v1/models/{model['id']}/versions", headers=steward.headers,
                    json=VERSION)
    assert r.status_code == 201, r.get_json()
    return r.get_json()


def test_lifecycle_end_to_end(client, people) -> None:  # type: ignore[no-untyped-def]
    steward, approver = people["steward"], people["approver"]
    v = _draft(client, steward)
    assert v["state"] == "draft" and v["unsafe_weights"] is False
    assert v["files"] == [{"path": "model.safetensors", "size": 10, "sha256": "a" * 64,
                           "kind": "weights"}]
    r = client.post(f"/api/v1/versions/{v['id']}/submit", headers=steward.headers, json={})
    assert r.get_json()["state"] == "submitted"
    r = client.post(f"/api/v1/versions/{v['id']}/approve", headers=approver.headers,
                    json=CONDITIONS)
    body = r.get_json()
    assert r.status_code == 200 and body["state"] == "approved"
    assert body["decisions"][0]["allowed_regions"] == ["eu-west"]
    assert body["decisions"][0]["decided_by"] == approver.actor.ref
    r = client.post(f"/api/v1/versions/{v['id']}/revoke", headers=approver.headers,
                    json={"reason": "license withdrawn by publisher"})
    assert r.get_json()["state"] == "revoked"

    actions = [e.action for e in list_events(EventFilter(target_id=v["id"]))]
    assert actions == ["version.create", "policy.decide", "version.submit", "policy.decide",
                       "version.approve", "version.revoke"]
    approve = list_events(EventFilter(action="version.approve"))[0]
    assert approve.details["conditions"]["allowed_purposes"] == ["assistant"]
    assert approve.request_id  # ties the event to the HTTP request
    assert verify_chain().ok


def test_an_editor_cannot_approve_or_reject_what_another_steward_submitted(  # type: ignore[no-untyped-def]
        client, people) -> None:
    """Separation of duties on every path: an approver (also a steward) who edited another
    steward's draft may not decide on it once that steward submits it."""
    steward, editor, approver = people["steward"], people["steward2"], people["approver"]
    v = _draft(client, steward)
    r = client.patch(f"/api/v1/versions/{v['id']}", headers=editor.headers,
                     json={"intended_use": "edited by the approver", "row_version": 1})
    assert r.status_code == 200, r.get_json()
    r = client.post(f"/api/v1/versions/{v['id']}/submit", headers=steward.headers, json={})
    assert r.get_json()["state"] == "submitted"
    for action, body in (("approve", CONDITIONS), ("reject", {"reason": "not this one"})):
        r = client.post(f"/api/v1/versions/{v['id']}/{action}", headers=editor.headers,
                        json=body)
        err = _error(r, 403, "self_approval_forbidden")
        assert err["details"]["rule"] == "four_eyes" and "edited" in err["message"]
    denied = list_events(EventFilter(target_id=v["id"], outcome="denied"))
    assert {e.action for e in denied} >= {"version.approve", "version.reject"}
    # Someone who changed nothing may.
    r = client.post(f"/api/v1/versions/{v['id']}/approve", headers=approver.headers,
                    json=CONDITIONS)
    assert r.status_code == 200 and r.get_json()["state"] == "approved"


def test_submitter_cannot_approve_and_the_attempt_is_audited(client, people) -> None:  # type: ignore[no-untyped-def]
    both = people["steward2"]  # steward and approver at once
    v = _draft(client, both)
    client.post(f"/api/v1/versions/{v['id']}/submit", headers=both.headers, json={})
    r = client.post(f"/api/v1/versions/{v['id']}/approve", headers=both.headers, json=CONDITIONS)
    err = _error(r, 403, "self_approval_forbidden")
    assert err["details"]["rule"] == "four_eyes"
    assert client.get(f"/api/v1/versions/{v['id']}", headers=both.headers).get_json()[
        "state"] == "submitted"
    denied = list_events(EventFilter(action="version.approve", outcome="denied"))
    assert len(denied) == 1 and denied[0].actor == both.actor.ref
    assert denied[0].details["code"] == "self_approval_forbidden"
    assert verify_chain().ok


@pytest.mark.parametrize("action,body", [
    ("approve", CONDITIONS), ("reject", {"reason": "nope"}), ("deprecate", {"reason": "old"}),
    ("revoke", {"reason": "bad"}),
])
def test_illegal_transitions_from_draft(client, people, action, body) -> None:  # type: ignore[no-untyped-def]
    v = _draft(client, people["steward"])
    r = client.post(f"/api/v1/versions/{v['id']}/{action}", headers=people["approver"].headers,
                    json=body)
    err = _error(r, 409, "illegal_transition")
    assert err["details"] == {"state": "draft", "action": action, "allowed_actions": ["submit"]}
    denied = list_events(EventFilter(action=f"version.{action}", outcome="denied"))
    assert [e.target_id for e in denied] == [v["id"]]


def test_approved_version_cannot_be_resubmitted_or_reapproved(client, people) -> None:  # type: ignore[no-untyped-def]
    v = _draft(client, people["steward"])
    client.post(f"/api/v1/versions/{v['id']}/submit", headers=people["steward"].headers, json={})
    client.post(f"/api/v1/versions/{v['id']}/approve", headers=people["approver"].headers,
                json=CONDITIONS)
    _error(client.post(f"/api/v1/versions/{v['id']}/submit", headers=people["steward"].headers,
                       json={}), 409, "illegal_transition")
    _error(client.post(f"/api/v1/versions/{v['id']}/approve",
                       headers=people["approver"].headers, json=CONDITIONS),
           409, "illegal_transition")


def test_stale_row_version_is_a_409_and_changes_nothing(client, people) -> None:  # type: ignore[no-untyped-def]
    steward = people["steward"]
    v = _draft(client, steward)
    r = client.patch(f"/api/v1/versions/{v['id']}", headers=steward.headers,
                     json={"row_version": v["row_version"], "intended_use": "chat"})
    assert r.status_code == 200 and r.get_json()["row_version"] == v["row_version"] + 1
    r = client.patch(f"/api/v1/versions/{v['id']}", headers=steward.headers,
                     json={"row_version": v["row_version"], "intended_use": "overwritten"})
    err = _error(r, 409, "stale_version")
    assert err["details"]["current_row_version"] == v["row_version"] + 1
    got = client.get(f"/api/v1/versions/{v['id']}", headers=steward.headers).get_json()
    assert got["intended_use"] == "chat"


def test_concurrent_edit_loses_at_the_database(configured, people) -> None:  # type: ignore[no-untyped-def]
    """Two sessions load the same row; the second flush is refused (version column)."""
    from charter import scope
    from charter.registry import service
    from charter.registry.models import ModelVersion
    from charter.registry.schemas import ModelCreate, VersionSpec

    steward = people["steward"].actor
    model = service.create_model(steward, ModelCreate(name="m", publisher="p", source_repo="p/m"))
    v = service.create_version(steward, model.id, VersionSpec(label="1"))
    sessions = scope.current().database.sessions
    with sessions() as a, sessions() as b:
        ra, rb = a.get(ModelVersion, v.id), b.get(ModelVersion, v.id)
        ra.intended_use, ra.row_version = "a", ra.row_version + 1
        a.commit()
        rb.intended_use, rb.row_version = "b", rb.row_version + 1
        from sqlalchemy.orm.exc import StaleDataError

        with pytest.raises(StaleDataError):
            b.commit()


def test_validation_collects_every_field_error(client, people) -> None:  # type: ignore[no-untyped-def]
    steward = people["steward"]
    r = client.post("/api/v1/models", headers=steward.headers, json={
        "name": "m", "publisher": "p", "source_repo": "p/m"})
    model_id = r.get_json()["id"]
    bad = {**VERSION, "label": "bad label!", "parameter_count": "many", "weight_format": "onnx",
           "files": [{"path": "../etc/passwd", "size": -1, "sha256": "xyz"}], "surprise": 1}
    err = _error(client.post(f"/api/v1/models/{model_id}/versions", headers=steward.headers,
                             json=bad), 422, "validation_failed")
    fields = {e["field"] for e in err["details"]["errors"]}
    assert {"label", "parameter_count", "weight_format", "files.0.path", "files.0.size",
            "files.0.sha256", "surprise"} <= fields
    codes = {e["field"]: e["code"] for e in err["details"]["errors"]}
    assert codes["surprise"] == "extra_forbidden"
    assert list_events(EventFilter(action="version.create")) == []


def test_license_ids_are_folded_to_one_form_or_refused(client, people) -> None:  # type: ignore[no-untyped-def]
    """What policy compares is stored in one canonical form (charter.identifiers): ASCII
    upper case folded; a license id outside ASCII is refused, naming the field."""
    steward = people["steward"]
    r = client.post("/api/v1/models", headers=steward.headers, json={
        "name": "m", "publisher": "p", "source_repo": "p/m"})
    model_id = r.get_json()["id"]
    r = client.post(f"/api/v1/models/{model_id}/versions", headers=steward.headers,
                    json={**VERSION, "license_declared": "Apache-2.0", "license_card": "MIT"})
    assert r.status_code == 201, r.get_json()
    version = r.get_json()
    assert (version["license_declared"], version["license_card"]) == ("apache-2.0", "mit")
    bad = {**VERSION, "label": "2.0", "license_declared": "\u0130sc", "license_card": "a b",
           "hosting_regions": ["EU-WEST"]}
    err = _error(client.post(f"/api/v1/models/{model_id}/versions", headers=steward.headers,
                             json=bad), 422, "validation_failed")
    fields = {e["field"] for e in err["details"]["errors"]}
    assert {"license_declared", "license_card", "hosting_regions.0"} <= fields, fields
    assert "must be an identifier" in str(err["details"]["errors"])
    assert len(list_events(EventFilter(action="version.create"))) == 1


def test_malformed_bodies(client, people, app) -> None:  # type: ignore[no-untyped-def]
    h = people["steward"].headers
    _error(client.post("/api/v1/models", headers=h, data="{not json",
                       content_type="application/json"), 400, "invalid_json")
    _error(client.post("/api/v1/models", headers=h, json=[1, 2]), 422, "validation_failed")
    _error(client.post("/api/v1/models", headers=h, data="name=x",
                       content_type="application/x-www-form-urlencoded"),
           415, "unsupported_media_type")
    big = {"name": "x" * (app.config["MAX_CONTENT_LENGTH"] + 10), "publisher": "p",
           "source_repo": "r"}
    err = _error(client.post("/api/v1/models", headers=h, json=big), 413, "payload_too_large")
    assert err["details"]["max_body_bytes"] == app.config["MAX_CONTENT_LENGTH"]
    deep = "[" * 100_000 + "]" * 100_000
    r = client.post("/api/v1/models", headers=h, data=deep, content_type="application/json")
    assert r.status_code in (400, 422)
    assert client.get("/api/v1/models", headers=h).get_json() == []


def test_unknown_ids_and_routes(client, people) -> None:  # type: ignore[no-untyped-def]
    h = people["auditor"].headers
    _error(client.get("/api/v1/versions/nope", headers=h), 404, "version_not_found")
    _error(client.get("/api/v1/models/nope", headers=h), 404, "model_not_found")
    _error(client.post("/api/v1/versions/nope/submit", headers=people["steward"].headers,
                       json={}), 404, "version_not_found")
    _error(client.get("/api/v1/no-such-thing", headers=h), 404, "not_found")
    _error(client.delete("/api/v1/models", headers=h), 405, "method_not_allowed")


def test_duplicate_names_conflict(client, people) -> None:  # type: ignore[no-untyped-def]
    h = people["steward"].headers
    body = {"name": "m", "publisher": "p", "source_repo": "p/m"}
    assert client.post("/api/v1/models", headers=h, json=body).status_code == 201
    _error(client.post("/api/v1/models", headers=h, json=body), 409, "model_exists")


def test_roles_are_enforced_and_refusals_audited(client, people) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/api/v1/models", headers=people["user"].headers,
                    json={"name": "m", "publisher": "p", "source_repo": "p/m"})
    err = _error(r, 403, "forbidden")
    assert err["details"]["required_roles"] == ["admin", "steward"]
    v = _draft(client, people["steward"])
    client.post(f"/api/v1/versions/{v['id']}/submit", headers=people["steward"].headers,
                json={})
    _error(client.post(f"/api/v1/versions/{v['id']}/approve", headers=people["auditor"].headers,
                       json=CONDITIONS), 403, "forbidden")
    _error(client.get("/api/v1/audit/events", headers=people["user"].headers), 403, "forbidden")
    denied = list_events(EventFilter(outcome="denied"))
    assert {(e.actor, e.action) for e in denied} == {
        (people["user"].actor.ref, "model.create"),
        (people["auditor"].actor.ref, "version.approve"),
        (people["user"].actor.ref, "audit.read"),
    }


def test_approval_conditions_are_checked(client, people) -> None:  # type: ignore[no-untyped-def]
    v = _draft(client, people["steward"])
    client.post(f"/api/v1/versions/{v['id']}/submit", headers=people["steward"].headers, json={})
    past = {**CONDITIONS, "expires_at": "2020-01-01T00:00:00Z", "allowed_regions": ["us-east"]}
    err = _error(client.post(f"/api/v1/versions/{v['id']}/approve",
                             headers=people["approver"].headers, json=past),
                 422, "validation_failed")
    assert {e["code"] for e in err["details"]["errors"]} == {"in_past", "not_hosting_region"}
    naive = {**CONDITIONS, "expires_at": "2099-01-01T00:00:00"}
    _error(client.post(f"/api/v1/versions/{v['id']}/approve",
                       headers=people["approver"].headers, json=naive),
           422, "validation_failed")
    missing = {k: v for k, v in CONDITIONS.items() if k != "allowed_purposes"}
    _error(client.post(f"/api/v1/versions/{v['id']}/approve",
                       headers=people["approver"].headers, json=missing),
           422, "validation_failed")


def test_pickle_weights_are_flagged_whatever_the_submitter_says(client, people) -> None:  # type: ignore[no-untyped-def]
    h = people["steward"].headers
    model = client.post("/api/v1/models", headers=h, json={
        "name": "m", "publisher": "p", "source_repo": "p/m"}).get_json()
    body = {**VERSION, "files": [{"path": "pytorch_model.bin", "size": 1, "sha256": "b" * 64}]}
    v = client.post(f"/api/v1/models/{model['id']}/versions", headers=h, json=body).get_json()
    assert v["unsafe_weights"] is True


def test_a_versions_task_is_its_cards_unless_the_steward_says(client, people) -> None:  # type: ignore[no-untyped-def]
    """generation or embedding: from the card's pipeline_tag, or chosen; it decides which
    gateway endpoints may serve the version (docs/dispatch.md)."""
    h = people["steward"].headers
    model = client.post("/api/v1/models", headers=h, json={
        "name": "bge", "publisher": "BAAI", "source_repo": "BAAI/bge-small-en-v1.5"}).get_json()
    url = f"/api/v1/models/{model['id']}/versions"
    card = {"pipeline_tag": "feature-extraction"}
    made = client.post(url, headers=h, json={**VERSION, "label": "1", "card": card}).get_json()
    assert made["task"] == "embedding"
    similar = {"pipeline_tag": "sentence-similarity"}
    made = client.post(url, headers=h, json={**VERSION, "label": "2", "card": similar}).get_json()
    assert made["task"] == "embedding"
    plain = client.post(url, headers=h, json={**VERSION, "label": "3"}).get_json()
    assert plain["task"] == "generation"
    chosen = client.post(url, headers=h, json={**VERSION, "label": "4", "card": card,
                                                "task": "generation"}).get_json()
    assert chosen["task"] == "generation"
    r = client.patch(f"/api/v1/versions/{plain['id']}", headers=h,
                     json={"row_version": plain["row_version"], "task": "embedding"})
    assert r.status_code == 200 and r.get_json()["task"] == "embedding"
    error = _error(client.post(url, headers=h, json={**VERSION, "label": "5",
                                                      "task": "rerank"}), 422,
                   "validation_failed")
    assert "task" in str(error["details"])
