"""Admission in the lifecycle: findings stored, approval refused, exceptions, fail closed."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from charter.audit.service import EventFilter, list_events, verify_chain
from charter.db import utcnow
from tests.integration.test_registry_api import CONDITIONS, VERSION
from tests.opa_server import OpaTestServer


@pytest.fixture
def people(make_person):  # type: ignore[no-untyped-def]
    return {"steward": make_person("steward"), "approver": make_person("approver"),
            "admin": make_person("admin"), "user": make_person("user")}


def _submitted(client, steward, **changes) -> dict:  # type: ignore[no-untyped-def]
    model = client.post("/api/v1/models", headers=steward.headers, json={
        "name": "TinyLlama", "publisher": "TinyLlama",
        "source_repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}).get_json()
    v = client.post(f"/api/v1/models/{model['id']}/versions", headers=steward.headers,
                    json={**VERSION, **changes}).get_json()
    r = client.post(f"/api/v1/versions/{v['id']}/submit", headers=steward.headers, json={})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_submit_stores_the_admission_findings(client, people) -> None:  # type: ignore[no-untyped-def]
    v = _submitted(client, people["steward"], license_card="gemma", source_revision="main")
    adm = v["admission"]
    assert adm["allow"] is False and adm["policy"] == "admission"
    assert {x["code"] for x in adm["violations"]} == {"license_mismatch", "revision_not_pinned"}
    assert adm["policy_revision"].startswith("sha256:") and adm["engine"] == "regorus"
    event = list_events(EventFilter(action="policy.decide", target_id=v["id"]))[0]
    assert event.outcome == "denied"
    assert event.details["decision_id"] == adm["decision_id"]
    assert event.details["violations"] == ["license_mismatch", "revision_not_pinned"]
    assert event.details["input_digest"] == adm["input_digest"]
    assert event.details["policy_revision"] == adm["policy_revision"]


def test_approval_is_refused_while_admission_denies(client, people) -> None:  # type: ignore[no-untyped-def]
    v = _submitted(client, people["steward"], license_card="gemma")
    r = client.post(f"/api/v1/versions/{v['id']}/approve", headers=people["approver"].headers,
                    json=CONDITIONS)
    assert r.status_code == 409
    err = r.get_json()["error"]
    assert err["code"] == "admission_denied" and err["details"]["violations"] == [
        "license_mismatch"]
    assert "differs from the model card" in err["message"]
    got = client.get(f"/api/v1/versions/{v['id']}", headers=people["user"].headers).get_json()
    assert got["state"] == "submitted" and got["decisions"] == []
    refusal = list_events(EventFilter(action="version.approve", outcome="denied"))
    assert refusal[0].details["code"] == "admission_denied"
    assert refusal[0].details["decision_id"] == err["details"]["decision_id"]


def test_admin_exception_lets_an_approval_through_until_it_expires(client, people, pg_conn) -> None:  # type: ignore[no-untyped-def]
    v = _submitted(client, people["steward"], license_card="gemma")
    url = f"/api/v1/versions/{v['id']}/exceptions"
    body = {"codes": ["license_mismatch"], "justification": "legal confirmed the card is stale",
            "expires_at": (utcnow() + timedelta(days=7)).isoformat()}
    r = client.post(url, headers=people["approver"].headers, json=body)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    r = client.post(url, headers=people["admin"].headers,
                    json={**body, "codes": ["pickle_weights"]})
    assert r.get_json()["error"]["details"]["errors"][0]["code"] == "not_a_finding"
    r = client.post(url, headers=people["admin"].headers,
                    json={**body, "expires_at": (utcnow() + timedelta(days=400)).isoformat()})
    assert r.get_json()["error"]["details"]["errors"][0]["code"] == "too_long"
    r = client.post(url, headers=people["admin"].headers, json={**body, "justification": "ok"})
    assert r.status_code == 422
    r = client.post(url, headers=people["admin"].headers, json=body)
    assert r.status_code == 201
    exc = r.get_json()["exceptions"][0]
    assert exc["codes"] == ["license_mismatch"] and exc["granted_by"] == people["admin"].actor.ref

    # The exception expires by itself: move it into the past and the approval is refused.
    pg_conn.execute("UPDATE policy_exceptions SET expires_at = now() - interval '1 minute'")
    r = client.post(f"/api/v1/versions/{v['id']}/approve", headers=people["approver"].headers,
                    json=CONDITIONS)
    assert r.get_json()["error"]["code"] == "admission_denied"
    pg_conn.execute("UPDATE policy_exceptions SET expires_at = now() + interval '1 day'")
    r = client.post(f"/api/v1/versions/{v['id']}/approve", headers=people["approver"].headers,
                    json=CONDITIONS)
    assert r.status_code == 200 and r.get_json()["state"] == "approved"
    approve = list_events(EventFilter(action="version.approve", outcome="success"))[0]
    assert approve.details["admission"]["waived"] == ["license_mismatch"]
    granted = list_events(EventFilter(action="version.exception"))
    assert [(e.actor, e.outcome) for e in granted] == [
        (people["approver"].actor.ref, "denied"), (people["admin"].actor.ref, "success")]
    assert verify_chain().ok


def test_rerunning_admission_records_a_new_decision(client, people) -> None:  # type: ignore[no-untyped-def]
    v = _submitted(client, people["steward"])
    assert v["admission"]["allow"] is True
    r = client.post(f"/api/v1/versions/{v['id']}/admission", headers=people["steward"].headers)
    assert r.status_code == 200
    assert r.get_json()["admission"]["decision_id"] != v["admission"]["decision_id"]
    r = client.post(f"/api/v1/versions/{v['id']}/admission", headers=people["user"].headers)
    assert r.get_json()["error"]["code"] == "forbidden"


def test_policy_endpoints(client, people) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/api/v1/policy", headers=people["user"].headers)
    body = r.get_json()
    assert body["engine"] == "regorus" and body["revision"].startswith("sha256:")
    assert "charter.admission" in body["packages"]
    assert "apache-2.0" in body["data"]["licenses"]
    r = client.post("/api/v1/policy/evaluate", headers=people["steward"].headers,
                    json={"policy": "dispatch", "input": {}})
    decision = r.get_json()
    assert r.status_code == 200 and decision["allow"] is False
    assert [v["code"] for v in decision["violations"]] == ["input_invalid"]
    event = list_events(EventFilter(action="policy.decide", target_id="dispatch"))[0]
    assert event.details["playground"] is True and event.outcome == "denied"
    r = client.post("/api/v1/policy/evaluate", headers=people["user"].headers,
                    json={"policy": "dispatch", "input": {}})
    assert r.get_json()["error"]["code"] == "forbidden"
    r = client.post("/api/v1/policy/evaluate", headers=people["steward"].headers,
                    json={"policy": "other", "input": {}})
    assert r.get_json()["error"]["code"] == "validation_failed"


@pytest.mark.parametrize("mode,code", [("hang", "policy_timeout"),
                                       ("error", "policy_engine_error"),
                                       ("undefined", "policy_undefined")])
def test_submit_fails_closed_when_the_remote_engine_misbehaves(configured, make_person, mode,  # type: ignore[no-untyped-def]
                                                               code) -> None:
    from tests.runtimes import app_for

    with OpaTestServer() as server:
        server.hang_s = 2.0
        settings = dataclasses.replace(configured, policy_backend="remote",
                                       opa_url=server.url, opa_timeout_s=0.3)
        client = app_for(settings).test_client()
        steward = make_person("steward")
        model = client.post("/api/v1/models", headers=steward.headers, json={
            "name": "m", "publisher": "TinyLlama", "source_repo": "p/m"}).get_json()
        v = client.post(f"/api/v1/models/{model['id']}/versions", headers=steward.headers,
                        json=VERSION).get_json()
        server.mode = mode
        r = client.post(f"/api/v1/versions/{v['id']}/submit", headers=steward.headers, json={})
        assert r.status_code == 503 and r.get_json()["error"]["code"] == code
        got = client.get(f"/api/v1/versions/{v['id']}", headers=steward.headers).get_json()
        assert got["state"] == "draft" and got["admission"] is None
        failure = list_events(EventFilter(action="policy.decide", outcome="failure"))
        assert len(failure) == 1 and failure[0].details["error"] == code
        assert failure[0].details["decision_id"] == r.get_json()["error"]["details"][
            "decision_id"]
        server.mode = "ok"  # recovery, same Charter process
        r = client.post(f"/api/v1/versions/{v['id']}/submit", headers=steward.headers, json={})
        assert r.status_code == 200 and r.get_json()["admission"]["engine"] == "opa"


def test_an_input_outside_its_contract_is_decided_before_any_engine(client, people) -> None:  # type: ignore[no-untyped-def]
    """Malformed input is denied by Charter itself (the same on every engine), naming the
    JSON path; the decision is recorded with the path it broke at."""
    import json
    from pathlib import Path

    base = json.loads((Path(__file__).resolve().parents[1] / "policy_cases" /
                       "dispatch.json").read_text())["base"]
    doc = {**base, "caller": {**base["caller"], "team": 5}}
    r = client.post("/api/v1/policy/evaluate", headers=people["steward"].headers,
                    json={"policy": "dispatch", "input": doc})
    decision = r.get_json()
    assert r.status_code == 200 and decision["allow"] is False
    assert [v["code"] for v in decision["violations"]] == ["input_invalid"]
    assert "/caller/team" in decision["violations"][0]["msg"]
    event = list_events(EventFilter(action="policy.decide", target_id="dispatch"))[-1]
    assert event.details["contract"] == "/caller/team" and event.outcome == "denied"
    # The base input itself meets the contract and reaches the engine.
    r = client.post("/api/v1/policy/evaluate", headers=people["steward"].headers,
                    json={"policy": "dispatch", "input": base})
    assert r.get_json()["allow"] is True
