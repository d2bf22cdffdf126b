"""The model inventory as a CycloneDX 1.6 ML-BOM, over HTTP against PostgreSQL."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from charter.audit.service import EventFilter, list_events, verify_chain
from charter.exports.mlbom import BomInvalidError, validate_ml_bom
from charter.registry import service as registry
from charter.registry.schemas import (
    ApprovalConditions,
    FileSpec,
    ModelCreate,
    RequiredReason,
    Transition,
    VersionSpec,
)

REV = "fe8a4ea1ffedaf415f4da2f062534de366a451e6"
BASE = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
EXPIRES = datetime.now(UTC) + timedelta(days=60)


def _conditions(reason: str = "reviewed") -> ApprovalConditions:
    return ApprovalConditions.model_validate_json(json.dumps({
        "allowed_regions": ["eu-west"], "allowed_data_classes": ["internal", "public"],
        "allowed_purposes": ["assistant"], "expires_at": EXPIRES.isoformat(),
        "reason": reason}))


def _version(steward, approver, name: str, label: str, *, state: str = "approved",
             license_: str = "apache-2.0", **spec: Any) -> Any:  # type: ignore[no-untyped-def]
    model = registry.find_model(name) or registry.create_model(steward.actor, ModelCreate(
        name=name, publisher="TinyLlama", source_repo=f"TinyLlama/{name}",
        description="a small chat model"))
    fields: dict[str, Any] = {
        "label": label, "source_revision": REV, "weight_format": "safetensors",
        "files": [FileSpec(path="model-00001-of-00002.safetensors", size=10, sha256="a" * 64),
                  FileSpec(path="model-00002-of-00002.safetensors", size=11, sha256="b" * 64),
                  FileSpec(path="config.json", size=2, sha256="c" * 64),
                  FileSpec(path="README.md", size=3, sha256="d" * 64)],
        "architecture": "LlamaForCausalLM", "parameter_count": 1100048384,
        "context_length": 2048, "license_declared": license_, "license_card": license_,
        "derivation": "fine_tune", "base_model": BASE,
        "datasets": ["cerebras/SlimPajama-627B", "HuggingFaceH4/ultrachat_200k"],
        "intended_use": "internal assistant", "storage_region": "eu-west",
        "hosting_regions": ["eu-west"], "card": {"pipeline_tag": "text-generation",
                                                 "license": license_},
        **spec,
    }
    v = registry.create_version(steward.actor, model.id, VersionSpec(**fields))
    if state == "draft":
        return v
    registry.submit_version(steward.actor, v.id, Transition())
    v = registry.approve_version(approver.actor, v.id, _conditions())
    if state == "revoked":
        v = registry.revoke_version(approver.actor, v.id, RequiredReason(reason="withdrawn"))
    return v


@pytest.fixture
def people(make_person):  # type: ignore[no-untyped-def]
    return {"steward": make_person("steward"), "approver": make_person("approver"),
            "auditor": make_person("auditor"), "admin": make_person("admin"),
            "user": make_person("user"), "operator": make_person("operator")}


@pytest.fixture
def inventory(people):  # type: ignore[no-untyped-def]
    s, a = people["steward"], people["approver"]
    return {
        "chat": _version(s, a, "TinyLlama-1.1B-Chat-v1.0", "1.0"),
        "revoked": _version(s, a, "TinyLlama-1.1B-Chat-v1.0", "0.9", state="revoked"),
        "draft": _version(s, a, "TinyLlama-1.1B-Chat-v1.0", "1.1", state="draft"),
        "custom": _version(s, a, "Llama-3-8B", "1", license_="llama3", base_model=None,
                           datasets=[], derivation="original"),
    }


def _bom(client, who, query: str = "") -> dict[str, Any]:  # type: ignore[no-untyped-def]
    r = client.get(f"/api/v1/exports/ml-bom{query}", headers=who.headers)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.headers["Content-Type"].startswith("application/vnd.cyclonedx+json")
    text = r.get_data(as_text=True)
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    return json.loads(text)


def _by_ref(bom: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["bom-ref"]: c for c in bom["components"]}


def _props(component: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in component.get("properties", []):
        out.setdefault(p["name"], []).append(p["value"])
    return out


def test_the_bom_lists_approved_versions_with_digests_licenses_and_conditions(
        client, people, inventory) -> None:  # type: ignore[no-untyped-def]
    bom = _bom(client, people["auditor"])
    assert (bom["bomFormat"], bom["specVersion"]) == ("CycloneDX", "1.6")
    comps = _by_ref(bom)
    models = {r for r, c in comps.items() if r.startswith("model-version/")}
    assert models == {f"model-version/{inventory['chat'].id}",
                      f"model-version/{inventory['custom'].id}"}  # no draft, no revoked
    chat = comps[f"model-version/{inventory['chat'].id}"]
    assert chat["type"] == "machine-learning-model"
    assert (chat["name"], chat["version"], chat["publisher"]) == (
        "TinyLlama-1.1B-Chat-v1.0", "1.0", "TinyLlama")
    # The pinned weight shards, not the config or the card.
    assert sorted(h["content"] for h in chat["hashes"]) == ["a" * 64, "b" * 64]
    assert {h["alg"] for h in chat["hashes"]} == {"SHA-256"}
    files = {f["name"]: f for f in chat["components"]}
    assert files["config.json"]["hashes"] == [{"alg": "SHA-256", "content": "c" * 64}]
    assert chat["purl"] == f"pkg:huggingface/TinyLlama/TinyLlama-1.1B-Chat-v1.0@{REV}"
    assert {(x["license"]["id"], x["license"]["acknowledgement"]) for x in chat["licenses"]} \
        == {("Apache-2.0", "concluded"), ("Apache-2.0", "declared")}
    refs = {r["type"]: r["url"] for r in chat["externalReferences"]}
    assert refs["model-card"] == (f"https://huggingface.co/TinyLlama/TinyLlama-1.1B-Chat-v1.0"
                                  f"/blob/{REV}/README.md")
    props = _props(chat)
    assert props["charter:state"] == ["approved"]
    assert props["charter:approval:region"] == ["eu-west"]
    assert props["charter:approval:data_class"] == ["internal", "public"]
    assert props["charter:approval:purpose"] == ["assistant"]
    assert props["charter:approval:approved_by"] == [people["approver"].actor.ref]
    assert props["charter:approval:expires_at"][0].startswith(EXPIRES.strftime("%Y-%m-%dT%H"))
    assert props["charter:admission:allow"] == ["true"]
    card = chat["modelCard"]["modelParameters"]
    assert card["task"] == "text-generation"
    assert card["modelArchitecture"] == "LlamaForCausalLM"
    datasets = [d["ref"] for d in card["datasets"]]
    assert all(comps[d]["type"] == "data" for d in datasets)
    assert {comps[d]["name"] for d in datasets} == {"cerebras/SlimPajama-627B",
                                                    "HuggingFaceH4/ultrachat_200k"}
    assert chat["modelCard"]["considerations"]["useCases"] == ["internal assistant"]
    # Lineage: the version depends on its base model.
    deps = {d["ref"]: d.get("dependsOn", []) for d in bom["dependencies"]}
    assert deps[chat["bom-ref"]] == [f"base-model/{BASE}"]
    base = comps[f"base-model/{BASE}"]
    assert base["purl"] == f"pkg:huggingface/{BASE}"
    # A license that is no SPDX id is named as it was declared.
    custom = comps[f"model-version/{inventory['custom'].id}"]
    assert {x["license"].get("name") for x in custom["licenses"]} == {"llama3"}
    assert "id" not in custom["licenses"][0]["license"]


def test_retired_versions_on_request_and_output_is_deterministic(
        client, people, inventory) -> None:  # type: ignore[no-untyped-def]
    retired = _bom(client, people["admin"], "?include_retired=true")
    comps = _by_ref(retired)
    revoked = comps[f"model-version/{inventory['revoked'].id}"]
    assert _props(revoked)["charter:state"] == ["revoked"]
    assert f"model-version/{inventory['draft'].id}" not in comps

    def stable(bom: dict[str, Any]) -> dict[str, Any]:
        bom = copy.deepcopy(bom)
        bom.pop("serialNumber")
        bom["metadata"].pop("timestamp")
        return bom

    first, second = _bom(client, people["auditor"]), _bom(client, people["auditor"])
    assert first["serialNumber"] != second["serialNumber"]
    assert stable(first) == stable(second)
    events = list_events(EventFilter(action="export.mlbom"))
    assert [e.outcome for e in events] == ["success"] * 3
    assert events[0].details["include_retired"] is True
    assert events[0].details["components"] == 3
    assert events[1].details["serial_number"] == first["serialNumber"]
    assert verify_chain().ok


def test_an_invalid_document_is_refused_by_the_validator() -> None:
    good = {"bomFormat": "CycloneDX", "specVersion": "1.6", "version": 1, "components": [
        {"type": "machine-learning-model", "name": "m", "bom-ref": "x",
         "modelCard": {"modelParameters": {"task": "text-generation"}}}]}
    validate_ml_bom(json.dumps(good))
    for broken in ({"modelParameters": {"tsk": "typo"}},
                   {"modelParameters": {"datasets": [{"ref": 1}]}}):
        bad = copy.deepcopy(good)
        bad["components"][0]["modelCard"] = broken
        with pytest.raises(BomInvalidError) as caught:
            validate_ml_bom(json.dumps(bad))
        assert caught.value.code == "mlbom_invalid"


@pytest.mark.parametrize("role", ["user", "steward", "approver", "operator"])
def test_only_auditors_and_admins_may_export(client, people, role) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/api/v1/exports/ml-bom", headers=people[role].headers)
    assert r.status_code == 403
    err = r.get_json()["error"]
    assert err["code"] == "forbidden"
    assert err["details"]["required_roles"] == ["admin", "auditor"]
    denied = list_events(EventFilter(action="export.mlbom"))
    assert [(e.actor, e.outcome) for e in denied] == [(people[role].actor.ref, "denied")]
    assert client.get("/api/v1/exports/ml-bom").status_code == 401


def test_the_exports_commands(database_url, people, inventory, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    import structlog
    from click.testing import CliRunner

    from charter.cli_exports import exports

    for key in list(os.environ):
        if key.startswith("CHARTER_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CHARTER_DATABASE_URL", database_url)
    runner = CliRunner()
    auditor = people["auditor"].actor.username
    try:
        r = runner.invoke(exports, ["ml-bom", "--as", auditor, "--include-retired"],
                          catch_exceptions=False)
        assert r.exit_code == 0, r.output
        bom = json.loads(r.stdout)
        assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(r.stdout) is None
        assert f"model-version/{inventory['revoked'].id}" in _by_ref(bom)
        page = tmp_path / "evidence.html"
        r = runner.invoke(exports, ["evidence", inventory["chat"].id, "--as", auditor,
                                    "--html", "-o", str(page)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert page.read_text().startswith("<!doctype html>")
        r = runner.invoke(exports, ["records", "--as", auditor, "--since",
                                    "2026-01-01T00:00:00Z", "--until", "2026-01-02T00:00:00Z",
                                    "--format", "jsonl"], catch_exceptions=False)
        assert r.exit_code == 0 and r.stdout == ""
        r = runner.invoke(exports, ["ml-bom", "--as", people["user"].actor.username])
        assert r.exit_code == 2 and "forbidden" in r.stderr
        r = runner.invoke(exports, ["records", "--as", auditor, "--since", "x",
                                    "--until", "2026-01-02T00:00:00Z"])
        assert r.exit_code == 2 and "validation_failed" in r.stderr
        actions = [(e.action, e.outcome) for e in list_events(EventFilter(
            target_type="export"))]
        assert actions == [("export.mlbom", "success"), ("export.evidence", "success"),
                           ("export.records", "success"), ("export.mlbom", "denied")]
    finally:
        structlog.reset_defaults()


@pytest.mark.parametrize("source,purl,page", [
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0",
     f"pkg:huggingface/TinyLlama/TinyLlama-1.1B-Chat-v1.0@{REV}",
     "https://huggingface.co/TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    ("modelscope:qwen/Qwen2-7B-Instruct", f"pkg:modelscope/qwen/Qwen2-7B-Instruct@{REV}",
     "https://modelscope.cn/models/qwen/Qwen2-7B-Instruct"),
    ("https://www.modelscope.cn/models/qwen/Qwen2-7B-Instruct/",
     f"pkg:modelscope/qwen/Qwen2-7B-Instruct@{REV}",
     "https://modelscope.cn/models/qwen/Qwen2-7B-Instruct"),
    ("https://git.example.org/models/in-house.git", None, None),
])
def test_each_hub_has_its_own_package_url(source: str, purl: str | None,
                                          page: str | None) -> None:
    """ModelScope's models are not Hugging Face packages: their own purl type and page."""
    from charter.exports.mlbom import hub_of, purl_of

    found = purl_of(source, REV)
    assert (str(found) if found else None) == purl
    assert (hub_of(source) or (None, None, None))[2] == page
