"""The console's pages without a browser (tests/e2e drives a real one): every page renders
for the roles that may see it and refuses the others, the lifecycle from the version page
with the four-eyes rule shown and enforced, CSRF on every form, exports downloaded."""

from __future__ import annotations

from datetime import timedelta

import pytest

from charter.audit import checkpoints
from charter.audit.verify import verify_bundle
from charter.db import utcnow
from charter.registry import service as registry
from charter.registry.schemas import FileSpec, ModelCreate, VersionSpec
from tests.audit_support import signing
from tests.console_support import Console, notices


@pytest.fixture
def signed_app(configured, tmp_path):  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    return app_for(signing(configured, tmp_path))


def _draft(owner, name: str = "tiny"):  # type: ignore[no-untyped-def]
    model = registry.create_model(owner.actor, ModelCreate(
        name=name, publisher="TinyLlama", source_repo=f"TinyLlama/{name}"))
    return registry.create_version(owner.actor, model.id, VersionSpec(
        label="1.0", source_revision="a" * 40, weight_format="safetensors",
        files=[FileSpec(path="model.safetensors", size=10, sha256="b" * 64)],
        license_declared="apache-2.0", license_card="apache-2.0", derivation="original",
        datasets=["slimpajama"], storage_region="eu-central", hosting_regions=["eu-central"],
        intended_use="<script>alert(1)</script> helpdesk answers"))


def test_every_page_renders_for_who_may_see_it(signed_app, make_person) -> None:  # type: ignore[no-untyped-def]
    steward = make_person("steward")
    version = _draft(steward)
    pages = {"/console/": None, "/console/models": None,
             f"/console/versions/{version.id}": None, "/console/nodes": ("admin", "operator",
                                                                       "auditor"),
             "/console/audit": ("admin", "auditor")}
    for role in ("admin", "steward", "approver", "operator", "auditor", "user"):
        tab = Console(signed_app, make_person(role).actor.user_id)
        for path, allowed in pages.items():
            r = tab.get(path)
            if allowed is None or role in allowed:
                assert r.status_code == 200, (role, path, r.status_code)
                assert 'aria-current="page"' in r.text
            else:
                assert r.status_code == 403 and 'data-code="forbidden"' in r.text, (role, path)
        nav = tab.get("/console/").text
        assert ('href="/console/audit"' in nav) == (role in ("admin", "auditor"))
        assert ('href="/console/nodes"' in nav) == (role in ("admin", "operator", "auditor"))
    page = Console(signed_app, steward.actor.user_id).get(f"/console/versions/{version.id}").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert "Commercial use: <strong>allowed</strong>" in page


def test_the_lifecycle_from_the_version_page(signed_app, make_person) -> None:  # type: ignore[no-untyped-def]
    steward, approver = make_person("steward", "approver"), make_person("approver")
    version = _draft(steward)
    mine = Console(signed_app, steward.actor.user_id)
    path = f"/console/versions/{version.id}"
    r = mine.post(f"{path}/submit", {"row_version": "1"})
    assert notices(r.text, "ok") == ["Submitted tiny 1.0 for approval."]
    assert 'id="four-eyes"' in r.text and 'id="approve-form"' not in r.text
    # The form is not offered; posting it anyway is refused by the service and audited.
    until = (utcnow() + timedelta(days=30)).date().isoformat()
    form = {"row_version": "2", "allowed_regions": "eu-central",
            "allowed_data_classes": "internal", "allowed_purposes": "assistant",
            "expires_at": until, "reason": "fine"}
    r = mine.post(f"{path}/approve", form)
    refused = notices(r.text, "error")
    assert any("four-eyes" in n and "(self_approval_forbidden)" in n for n in refused), refused
    other = Console(signed_app, approver.actor.user_id)
    page = other.get(path).text
    assert 'id="approve-form"' in page and 'id="four-eyes"' not in page
    r = other.post(f"{path}/approve", {**form, "allowed_data_classes": ""})
    assert any("allowed_data_classes" in n for n in notices(r.text, "error"))
    r = other.post(f"{path}/approve", form, csrf=False, follow=False)
    assert r.status_code == 403 and 'data-code="csrf_failed"' in r.text
    r = other.post(f"{path}/approve", form)
    assert notices(r.text, "ok") == [f"Approved tiny 1.0 until {until}."]
    assert registry.get_version(version.id).state == "approved"
    r = other.post(f"{path}/revoke", {"row_version": "3", "reason": "leaked weights"})
    assert any("confirmation_required" in n for n in notices(r.text, "error"))
    r = other.post(f"{path}/revoke", {"row_version": "3", "reason": "leaked weights",
                                      "confirm": "revoke"})
    assert notices(r.text, "ok") == ["Revoked tiny 1.0: its traffic stopped."]
    trail = r.text[r.text.index('id="trail"'):]
    for action in ("version.submit", "version.approve", "version.revoke"):
        assert action in trail


def test_the_auditor_downloads_what_verifies(signed_app, make_person, tmp_path) -> None:  # type: ignore[no-untyped-def]
    steward, auditor = make_person("steward"), make_person("auditor")
    version = _draft(steward)
    tab = Console(signed_app, auditor.actor.user_id)
    r = tab.post("/console/audit/export", {"target_type": "model_version",
                                           "target_id": version.id}, follow=False)
    assert r.status_code == 200 and r.mimetype == "application/zip"
    key = checkpoints.load_signers(signed_app.extensions["charter.settings"])[0].verifier
    report = verify_bundle(r.data, [key])
    assert report.ok and report.events >= 1
    r = tab.post("/console/audit/export", {"since": "yesterday"}, follow=False)
    assert r.status_code == 422 and "(validation_failed)" in r.text
    r = tab.post("/console/audit/verify")
    assert r.status_code == 200 and "chain verified" in r.text
    r = tab.get("/console/audit/ml-bom")
    assert r.status_code == 200 and r.get_json()["bomFormat"] == "CycloneDX"
    r = tab.get(f"/console/versions/{version.id}/evidence?format=html")
    assert r.status_code == 200 and "tiny" in r.text
    r = tab.get(f"/console/audit?target_type=model_version&target_id={version.id}")
    assert "version.create" in r.text or "model_version" in r.text
    assert 'id="checkpoints"' in r.text
    from charter.audit.service import EventFilter, list_events

    export = list_events(EventFilter(action="audit.export"))[0]
    assert export.request_id
    r = tab.get(f"/console/audit?request_id={export.request_id}")
    assert r.text.count('<tr id="event-') == 1 and f'id="event-{export.seq}"' in r.text
    api = signed_app.test_client().get(
        f"/api/v1/audit/events?request_id={export.request_id}", headers=auditor.headers)
    assert [e["seq"] for e in api.get_json()["events"]] == [export.seq]
    r = Console(signed_app, steward.actor.user_id).get("/console/audit/ml-bom")
    assert r.status_code == 403


def test_the_overview_names_denied_versions_by_name(signed_app, make_person) -> None:  # type: ignore[no-untyped-def]
    """A denied admission lists as "tiny-denied 1.0", linked, not as a version's id."""
    from charter.registry.schemas import Transition

    steward = make_person("steward")
    model = registry.create_model(steward.actor, ModelCreate(
        name="tiny-denied", publisher="Nobody", source_repo="nobody/tiny"))
    version = registry.create_version(steward.actor, model.id, VersionSpec(
        label="1.0", source_revision="main", weight_format="safetensors", files=[],
        derivation="original", datasets=[]))
    registry.submit_version(steward.actor, version.id, Transition())  # admission denies
    page = Console(signed_app, make_person("approver").actor.user_id).get("/console/").text
    table = page[page.index('id="recent-denials"'):]
    assert f'href="/console/versions/{version.id}">tiny-denied 1.0</a>' in table
    assert f"model_version {version.id}" not in table


def test_the_audit_page_names_versions_teams_and_nodes(signed_app, make_person) -> None:  # type: ignore[no-untyped-def]
    """Targets read as people call them; the id stays in the link and its title."""
    from charter.actor import SYSTEM
    from charter.identity.teams import create_team
    from charter.registry.schemas import Transition

    steward = make_person("steward")
    model = registry.create_model(steward.actor, ModelCreate(
        name="tiny-audited", publisher="Nobody", source_repo="nobody/audited"))
    version = registry.create_version(steward.actor, model.id, VersionSpec(
        label="2.0", source_revision="main", weight_format="safetensors", files=[],
        derivation="original", datasets=[]))
    registry.submit_version(steward.actor, version.id, Transition())
    team = create_team(SYSTEM, name="named-team", description="", requests_per_day=None,
                       entitlements={}, default_data_class="internal")
    page = Console(signed_app, make_person("auditor").actor.user_id).get("/console/audit").text
    assert f'title="{version.id}">model_version tiny-audited 2.0</a>' in page
    assert f'title="{team.id}">team named-team</a>' in page
    assert f">model_version {version.id}</a>" not in page


def test_the_version_page_shows_its_evaluation_evidence(signed_app, make_person) -> None:  # type: ignore[no-untyped-def]
    import json

    from charter.registry.schemas import EvaluationIn

    steward = make_person("steward")
    version = _draft(steward)
    tab = Console(signed_app, steward.actor.user_id)
    assert "No evaluation results are attached" in tab.get(
        f"/console/versions/{version.id}").text
    results = {"results": {"arc_easy": {"acc,none": 0.7563, "acc_stderr,none": 0.0088},
                           "<b>x</b>": {"acc,none": 0.5}},
               "n-shot": {"arc_easy": 5}, "model_name": "TinyLlama/tiny"}
    registry.attach_evaluation(steward.actor, version.id, EvaluationIn(
        content=json.dumps(results), file_name="results.json"))
    page = tab.get(f"/console/versions/{version.id}").text
    assert ("<td>arc_easy</td><td>acc</td><td>none</td><td>0.7563</td><td>0.0088</td>"
            "<td>5</td>") in page
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


def test_the_model_card_is_kept_and_shown_without_its_html(signed_app, make_person,  # type: ignore[no-untyped-def]
                                                           tmp_path) -> None:
    """The card's Markdown from the import, rendered: headings, lists and tables read as
    such; raw HTML, script links and images do not become live."""
    import shutil

    from charter.devnode.tinymodel import build_tiny_model
    from charter.registry.importer import ImportOptions, import_directory

    root = build_tiny_model(tmp_path / "carded")
    card = (root / "README.md").read_text()
    (root / "README.md").write_text(card + (
        "\n## Evaluation\n\n| task | acc |\n|---|---|\n| arc_easy | 0.61 |\n\n"
        "<script>alert('card')</script>\n\n[click](javascript:alert(1)) "
        "[docs](https://example.org/docs) ![logo](https://example.org/logo.png)\n"))
    steward = make_person("steward")
    version, _ = import_directory(steward.actor, root, ImportOptions(
        model_name="carded", label="1", publisher="charter", source_repo="charter/carded"))
    assert "<script>alert('card')</script>" in registry.card_text(version.id)
    page = Console(signed_app, steward.actor.user_id).get(f"/console/versions/{version.id}").text
    shown = page.split('id="model-card">', 1)[1].split("</section>", 1)[0]
    assert "<h2>Evaluation</h2>" in shown and "<td>arc_easy</td>" in shown
    assert "<script>" not in shown and "&lt;script&gt;" in shown
    assert "javascript:" not in shown.replace("[click](javascript:alert(1))", "")
    assert 'href="https://example.org/docs"' in shown
    assert "<img" not in page
    shutil.rmtree(root)
