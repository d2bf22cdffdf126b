"""A version's approval evidence pack, as JSON and as a self-contained HTML page."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest

from charter.audit.service import EventFilter, list_events, verify_chain
from tests.integration.test_exports_mlbom import BASE, REV

HOSTILE = "<script>alert(1)</script>\r\nInjected: \x1b[31mred\x1b[0m"
CONDITIONS = {"allowed_regions": ["eu-west"], "allowed_data_classes": ["internal"],
              "allowed_purposes": ["assistant"], "expires_at": "2099-01-01T00:00:00Z"}


@pytest.fixture
def people(make_person):  # type: ignore[no-untyped-def]
    return {"author": make_person("steward", "approver"), "approver": make_person("approver"),
            "auditor": make_person("auditor"), "admin": make_person("admin"),
            "steward": make_person("steward"), "user": make_person("user")}


@pytest.fixture
def version(client, people) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Made and submitted by a steward who is also an approver: the self-approval is
    refused (and audited); a second person approves with a hostile justification."""
    author, approver = people["author"], people["approver"]
    r = client.post("/api/v1/models", headers=author.headers, json={
        "name": HOSTILE, "publisher": "TinyLlama", "source_repo": "TinyLlama/chat"})
    assert r.status_code == 201, r.get_json()
    model = r.get_json()
    r = client.post(f"/api/v1/models/{model['id']}/versions", headers=author.headers, json={
        "label": "1.0", "source_revision": REV, "weight_format": "safetensors",
        "files": [{"path": "model.safetensors", "size": 10, "sha256": "a" * 64}],
        "license_declared": "apache-2.0", "license_card": "apache-2.0",
        "derivation": "fine_tune", "base_model": BASE, "datasets": ["ds/one"],
        "intended_use": HOSTILE, "storage_region": "eu-west", "hosting_regions": ["eu-west"]})
    assert r.status_code == 201, r.get_json()
    v = r.get_json()
    assert client.post(f"/api/v1/versions/{v['id']}/submit", headers=author.headers,
                       json={"reason": "ready"}).status_code == 200
    r = client.post(f"/api/v1/versions/{v['id']}/approve", headers=author.headers,
                    json={**CONDITIONS, "reason": "my own"})
    assert r.get_json()["error"]["code"] == "self_approval_forbidden"
    r = client.post(f"/api/v1/versions/{v['id']}/approve", headers=approver.headers,
                    json={**CONDITIONS, "reason": HOSTILE})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def _pack(client, who, version_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    r = client.get(f"/api/v1/exports/versions/{version_id}/evidence", headers=who.headers)
    assert r.status_code == 200, r.get_json()
    assert r.mimetype == "application/json"
    return r.get_json()


def test_the_pack_shows_both_people_the_refusal_and_the_findings(
        client, people, version) -> None:  # type: ignore[no-untyped-def]
    author, approver = people["author"].actor.ref, people["approver"].actor.ref
    pack = _pack(client, people["auditor"], version["id"])
    assert pack["format"] == "charter.evidence-pack/1"
    assert pack["model"]["name"] == HOSTILE  # JSON keeps the text exactly
    assert pack["version"]["state"] == "approved"
    assert pack["files"] == [{"path": "model.safetensors", "size": 10, "sha256": "a" * 64,
                              "kind": "weights"}]
    assert pack["license"] == {"declared": "apache-2.0", "card": "apache-2.0", "agree": True}
    assert pack["lineage"]["base_model"] == BASE
    assert pack["lineage"]["purl"] == f"pkg:huggingface/TinyLlama/chat@{REV}"
    people_ = pack["people"]
    assert (people_["created_by"], people_["submitted_by"]) == (author, author)
    assert people_["decided_by"] == [approver]
    assert people_["four_eyes"]["held"] is True
    [decision] = pack["decisions"]
    assert (decision["decision"], decision["decided_by"], decision["reason"]) == (
        "approved", approver, HOSTILE)
    assert decision["allowed_regions"] == ["eu-west"] and not decision["decider_is_author"]
    assert [(x["action"], x["actor"], x["code"]) for x in pack["refusals"]] == [
        ("version.approve", author, "self_approval_forbidden")]
    assert [(e["action"], e["actor"]) for e in pack["lifecycle"]] == [
        ("version.create", author), ("version.submit", author), ("version.approve", approver)]
    assert pack["lifecycle"][-1]["conditions"]["allowed_purposes"] == ["assistant"]
    admissions = pack["admission"]["history"]
    assert len(admissions) == 2 and all(a["allow"] for a in admissions)
    assert pack["admission"]["latest"]["decision_id"] == admissions[-1]["decision_id"]

    # The trail is the log's own events about the version and its model, in seq order.
    trail = pack["audit_trail"]
    logged = sorted(list_events(EventFilter(target_id=version["id"]))
                    + list_events(EventFilter(target_id=version["model_id"])),
                    key=lambda e: e.seq)
    assert [(e["seq"], e["hash"], e["prev_hash"]) for e in trail] == [
        (e.seq, e.hash, e.prev_hash) for e in logged]
    assert trail[0]["action"] == "model.create"
    assert pack["audit_head"]["seq"] >= trail[-1]["seq"]

    exports = list_events(EventFilter(action="export.evidence"))
    assert [(e.actor, e.details["version_id"], e.details["format"]) for e in exports] == [
        (people["auditor"].actor.ref, version["id"], "json")]
    assert verify_chain().ok


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_the_html_page_escapes_what_people_wrote_and_needs_nothing_outside(
        client, people, version) -> None:  # type: ignore[no-untyped-def]
    r = client.get(f"/api/v1/exports/versions/{version['id']}/evidence?format=html",
                   headers=people["admin"].headers)
    assert r.status_code == 200
    assert r.mimetype == "text/html"
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    page = r.get_data(as_text=True)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "\x1b" not in page and "\r" not in page  # shown as visible escapes instead
    assert "\\r\nInjected: \\x1b[31mred\\x1b[0m" in page
    assert page.count("\\x1b[31m") >= 3  # name, intended use, justification
    parser = _Tags()
    parser.feed(page)
    tags = {t for t, _ in parser.tags}
    assert "script" not in tags and "link" not in tags and "img" not in tags
    assert not [a for _, a in parser.tags if "src" in a or "href" in a]
    assert "<style>" in page  # inline CSS only
    assert "@media print" in page
    author, approver = people["author"].actor.ref, people["approver"].actor.ref
    assert author in page and approver in page
    assert "self_approval_forbidden" in page
    assert re.search(r"Four-eyes rule</dt><dd>.*?held", page, re.S)
    assert "a" * 64 in page
    event = list_events(EventFilter(action="export.evidence"))[-1]
    assert event.details["format"] == "html"


def test_unknown_versions_and_other_roles(client, people, version) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/api/v1/exports/versions/nope/evidence", headers=people["auditor"].headers)
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "version_not_found"
    for role in ("steward", "user", "approver"):
        r = client.get(f"/api/v1/exports/versions/{version['id']}/evidence",
                       headers=people[role].headers)
        assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    r = client.get(f"/api/v1/exports/versions/{version['id']}/evidence?format=pdf",
                   headers=people["auditor"].headers)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "validation_failed"
    denied = list_events(EventFilter(action="export.evidence", outcome="denied"))
    assert {e.actor for e in denied} == {people[r].actor.ref
                                         for r in ("steward", "user", "approver")}
    assert list_events(EventFilter(action="export.evidence", outcome="success")) == []
