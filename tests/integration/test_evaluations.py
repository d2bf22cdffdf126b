"""Evaluation results attached to a version as evidence, over HTTP against PostgreSQL:
lm-eval-harness's results JSON and OpenCompass's summary read into metrics, kept with their
digest and who attached them; a malformed file, one about another model (or another
revision), and the same file twice refused with their codes, and audited."""

from __future__ import annotations

import hashlib
import json

import pytest

from charter.audit.service import EventFilter, list_events
from charter.registry.evaluations import MalformedResults, matches, parse

REVISION = "fe8a4ea1ffedaf415f4da2f062534de366a451e6"

# The shape lm-eval-harness 0.4 writes (`lm_eval --output_path`): trimmed, not invented.
LM_EVAL = {
    "results": {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.7563, "acc_stderr,none": 0.0088,
                     "acc_norm,none": 0.7218, "acc_norm_stderr,none": 0.0092},
        "hellaswag": {"alias": "hellaswag", "acc,none": 0.4512, "acc_stderr,none": "N/A"},
    },
    "group_subtasks": {"arc_easy": [], "hellaswag": []},
    "configs": {"arc_easy": {"task": "arc_easy", "num_fewshot": 0}},
    "versions": {"arc_easy": 1.0, "hellaswag": 1.0},
    "n-shot": {"arc_easy": 0, "hellaswag": 0},
    "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True},
                         "hellaswag": {"acc": True}},
    "n-samples": {"arc_easy": {"original": 2376, "effective": 2376},
                  "hellaswag": {"original": 10042, "effective": 10042}},
    "config": {"model": "hf", "model_args":
               f"pretrained=TinyLlama/TinyLlama-1.1B-Chat-v1.0,revision={REVISION},"
               "dtype=bfloat16", "batch_size": "8", "device": "cuda:0", "limit": None,
               "bootstrap_iters": 100000},
    "git_hash": "a1b2c3d", "date": 1764979200.5,
    "task_hashes": {"arc_easy": "9f86d081884c7d659a2feaa0c55ad015",
                    "hellaswag": "60303ae22b998861bce3b28f33eec1be"},
    "model_source": "hf", "model_name": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "model_name_sanitized": "TinyLlama__TinyLlama-1.1B-Chat-v1.0",
    "total_evaluation_time_seconds": "812.4",
}
OPENCOMPASS = """dataset,version,metric,mode,tinyllama-1.1b-chat-v1.0-hf,qwen2-0.5b-hf
--------- 考试 Exam ---------,-,-,-,-,-
ceval,-,naive_average,gen,27.31,58.21
mmlu,-,naive_average,ppl,25.96,44.10
gsm8k,1d7fe4,accuracy,gen,-,31.92
"""


@pytest.fixture
def version(client, make_person):  # type: ignore[no-untyped-def]
    steward = make_person("steward")
    r = client.post("/api/v1/models", headers=steward.headers, json={
        "name": "TinyLlama", "publisher": "TinyLlama",
        "source_repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"})
    assert r.status_code == 201, r.get_json()
    r = client.post(f"/api/v1/models/{r.get_json()['id']}/versions", headers=steward.headers,
                    json={"label": "1.0", "source_revision": REVISION,
                          "weight_format": "safetensors", "license_declared": "apache-2.0",
                          "files": [{"path": "model.safetensors", "size": 1,
                                     "sha256": "a" * 64}]})
    assert r.status_code == 201, r.get_json()
    return steward, r.get_json()["id"]


def _error(resp, status: int, code: str) -> dict:  # type: ignore[no-untyped-def]
    assert resp.status_code == status, resp.get_json()
    error = resp.get_json()["error"]
    assert error["code"] == code, error
    return error


def test_lm_eval_results_are_read_kept_with_their_digest_and_audited(client, version) -> None:  # type: ignore[no-untyped-def]
    steward, vid = version
    content = json.dumps(LM_EVAL, indent=2)
    r = client.post(f"/api/v1/versions/{vid}/evaluations", headers=steward.headers,
                    json={"content": content, "file_name": "results_2026-12-06.json"})
    assert r.status_code == 201, r.get_json()
    got = r.get_json()
    assert got["format"] == "lm-eval" and got["attached_by"] == steward.actor.ref
    assert got["sha256"] == hashlib.sha256(content.encode()).hexdigest()
    assert got["model_named"] == ["TinyLlama/TinyLlama-1.1B-Chat-v1.0"]
    assert got["revision"] == REVISION and got["evaluated_at"].startswith("2025-12-06")
    by = {(m["task"], m["metric"]): m for m in got["metrics"]}
    assert set(by) == {("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("hellaswag", "acc")}
    assert by["arc_easy", "acc"] == {
        "task": "arc_easy", "metric": "acc", "filter": "none", "value": 0.7563,
        "stderr": 0.0088, "n_shot": 0, "higher_is_better": True, "task_version": "1.0",
        "samples": 2376}
    assert by["hellaswag", "acc"]["stderr"] is None  # "N/A" is no figure
    assert got["task_hashes"]["arc_easy"] == "9f86d081884c7d659a2feaa0c55ad015"
    listed = client.get(f"/api/v1/versions/{vid}/evaluations", headers=steward.headers)
    assert listed.status_code == 200 and [e["id"] for e in listed.get_json()] == [got["id"]]
    [event] = list_events(EventFilter(action="version.evaluation_attach"))
    assert event.outcome == "success" and event.target_id == vid
    assert event.details["sha256"] == got["sha256"]
    assert event.details["tasks"] == ["arc_easy", "hellaswag"] and event.details["metrics"] == 3
    # The same file again: refused, audited, nothing added.
    again = client.post(f"/api/v1/versions/{vid}/evaluations", headers=steward.headers,
                        json={"content": content})
    assert _error(again, 409, "evaluation_exists")["details"]["sha256"] == got["sha256"]
    assert len(client.get(f"/api/v1/versions/{vid}/evaluations",
                          headers=steward.headers).get_json()) == 1


def test_an_opencompass_summary_gives_this_versions_column(client, version) -> None:  # type: ignore[no-untyped-def]
    steward, vid = version
    url = f"/api/v1/versions/{vid}/evaluations"
    several = _error(client.post(url, headers=steward.headers, json={"content": OPENCOMPASS}),
                     422, "evaluation_malformed")
    assert "holds 2 models" in several["message"]
    r = client.post(url, headers=steward.headers, json={
        "content": OPENCOMPASS, "column": "tinyllama-1.1b-chat-v1.0-hf"})
    assert r.status_code == 201, r.get_json()
    metrics = [(m["task"], m["metric"], m["filter"], m["value"])
               for m in r.get_json()["metrics"]]
    assert metrics == [("ceval", "naive_average", "gen", 27.31),
                       ("mmlu", "naive_average", "ppl", 25.96)]  # gsm8k: `-`, no figure
    other = client.post(url, headers=steward.headers, json={
        "content": OPENCOMPASS, "column": "qwen2-0.5b-hf"})
    assert _error(other, 422, "evaluation_model_mismatch")["details"]["named"] == [
        "qwen2-0.5b-hf", "qwen2-0.5b"]


@pytest.mark.parametrize("content,needle", [
    ("not a results file", "neither"),
    ("{\"results\": 3}", "object `results`"),
    ("{\"results\": {\"arc_easy\": {\"alias\": \"arc_easy\"}}}", "no numeric metric"),
    ("{\"results\": {\"arc\": {\"acc,none\": 0.5}}", "not JSON"),
    ("dataset,version,metric\nmmlu,-,acc", "starts `dataset,version,metric,mode`"),
    ("dataset,version,metric,mode\nmmlu,-,acc,gen", "no model column"),
    ("{\"results\": " + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ("dataset,version,metric,mode,m\nmmlu,-,acc,gen,\"" + "x" * 200_000 + "\"",
     "not CSV this parser can read"),

])
def test_a_malformed_file_is_refused_and_audited(client, version, content, needle) -> None:  # type: ignore[no-untyped-def]
    steward, vid = version
    r = client.post(f"/api/v1/versions/{vid}/evaluations", headers=steward.headers,
                    json={"content": content})
    assert needle in _error(r, 422, "evaluation_malformed")["message"]
    [event] = list_events(EventFilter(action="version.evaluation_attach"))
    assert event.outcome == "denied" and event.details["code"] == "evaluation_malformed"
    assert client.get(f"/api/v1/versions/{vid}/evaluations",
                      headers=steward.headers).get_json() == []


def test_results_of_another_model_or_revision_are_refused(client, version) -> None:  # type: ignore[no-untyped-def]
    steward, vid = version
    url = f"/api/v1/versions/{vid}/evaluations"
    other = {**LM_EVAL, "model_name": "Qwen/Qwen2-0.5B",
             "config": {"model": "hf", "model_args": "pretrained=Qwen/Qwen2-0.5B"}}
    error = _error(client.post(url, headers=steward.headers, json={
        "content": json.dumps(other)}), 422, "evaluation_model_mismatch")
    assert "Qwen/Qwen2-0.5B" in error["message"] and error["details"]["expected"] == [
        "TinyLlama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"]
    moved = {**LM_EVAL, "config": {"model": "hf", "model_args":
             "pretrained=TinyLlama/TinyLlama-1.1B-Chat-v1.0,revision=main"}}
    error = _error(client.post(url, headers=steward.headers, json={
        "content": json.dumps(moved)}), 422, "evaluation_model_mismatch")
    assert "at revision main" in error["message"]
    unnamed = {"results": LM_EVAL["results"]}
    _error(client.post(url, headers=steward.headers, json={"content": json.dumps(unnamed)}),
           422, "evaluation_model_mismatch")
    events = list_events(EventFilter(action="version.evaluation_attach"))
    assert [e.details["code"] for e in events] == ["evaluation_model_mismatch"] * 3
    # A local path ending in the repository's name is the same model.
    local = {**LM_EVAL, "model_name": "/models/TinyLlama-1.1B-Chat-v1.0",
             "config": {"model": "hf", "model_args": "pretrained=/models/TinyLlama-1.1B-Chat-v1.0"}}
    assert client.post(url, headers=steward.headers, json={
        "content": json.dumps(local)}).status_code == 201


@pytest.mark.parametrize("bad", ["{\"results\": {}}\x00", "{\"results\": {}} \ud800"])
def test_text_a_database_cannot_hold_is_refused_with_the_body(client, version, bad) -> None:  # type: ignore[no-untyped-def]
    steward, vid = version
    r = client.post(f"/api/v1/versions/{vid}/evaluations", headers=steward.headers,
                    json={"content": bad})
    assert _error(r, 422, "validation_failed")["details"]["errors"][0]["code"] == (
        "unstorable_text")


def test_only_stewards_attach_and_a_missing_version_is_404(client, version, make_person) -> None:  # type: ignore[no-untyped-def]
    _, vid = version
    user = make_person("user")
    r = client.post(f"/api/v1/versions/{vid}/evaluations", headers=user.headers,
                    json={"content": json.dumps(LM_EVAL)})
    _error(r, 403, "forbidden")
    steward = make_person("steward")
    r = client.post("/api/v1/versions/nope/evaluations", headers=steward.headers,
                    json={"content": json.dumps(LM_EVAL)})
    _error(r, 404, "version_not_found")


def test_names_match_the_model_not_a_lookalike() -> None:
    known = ["TinyLlama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"]
    assert matches(("tinyllama/tinyllama-1.1b-chat-v1.0",), known)
    assert matches(("./models/TinyLlama-1.1B-Chat-v1.0/",), known)
    assert not matches(("evil/TinyLlama-1.1B-Chat-v1.0",), known)  # another org's repo
    assert not matches(("TinyLlama/TinyLlama-1.1B",), known)
    with pytest.raises(MalformedResults):
        parse("{}", "lm-eval")
    assert parse(json.dumps(LM_EVAL)).format == "lm-eval"


def test_a_high_risk_version_is_admitted_on_its_evidence(client, make_person) -> None:  # type: ignore[no-untyped-def]
    """policies/data/evidence.json: a high-risk version needs arc_easy acc >= 0.5 from
    the last 365 days. Missing, then too low (shown with its numbers), then met: the
    approval follows the evidence."""
    import time
    from datetime import UTC, datetime, timedelta

    steward, approver = make_person("steward"), make_person("approver")
    r = client.post("/api/v1/models", headers=steward.headers, json={
        "name": "TinyLlama", "publisher": "TinyLlama",
        "source_repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"})
    r = client.post(f"/api/v1/models/{r.get_json()['id']}/versions", headers=steward.headers,
                    json={"label": "1.0", "source_revision": REVISION, "risk_tier": "high",
                          "weight_format": "safetensors", "license_declared": "apache-2.0",
                          "license_card": "apache-2.0", "derivation": "original",
                          "datasets": ["cerebras/SlimPajama-627B"],
                          "storage_region": "eu-west", "hosting_regions": ["eu-west"],
                          "files": [{"path": "model.safetensors", "size": 1,
                                     "sha256": "a" * 64}]})
    assert r.status_code == 201, r.get_json()
    vid = r.get_json()["id"]
    r = client.post(f"/api/v1/versions/{vid}/submit", headers=steward.headers, json={})
    assert r.status_code == 200, r.get_json()
    found = r.get_json()["admission"]["violations"]
    assert [v["code"] for v in found] == ["evaluation_missing"], found
    assert "arc_easy acc (filter none)" in found[0]["msg"]

    def attach(acc: float, days_ago: int) -> None:
        doc = json.loads(json.dumps(LM_EVAL))
        doc["results"]["arc_easy"]["acc,none"] = acc
        doc["date"] = time.time() - days_ago * 86400
        r = client.post(f"/api/v1/versions/{vid}/evaluations", headers=steward.headers,
                        json={"content": json.dumps(doc)})
        assert r.status_code == 201, r.get_json()

    attach(0.4512, 3)
    r = client.post(f"/api/v1/versions/{vid}/admission", headers=steward.headers)
    found = r.get_json()["admission"]["violations"]
    assert found == [{"code": "evaluation_below_threshold", "msg":
                      "arc_easy acc (filter none) is 451200 ppm at best; requirement "
                      "high-risk-reasoning needs at least 500000 ppm"}], found
    conditions = {"allowed_regions": ["eu-west"], "allowed_data_classes": ["internal"],
                  "allowed_purposes": ["assistant"], "reason": "reviewed",
                  "expires_at": (datetime.now(UTC) + timedelta(days=30)).isoformat()}
    r = client.post(f"/api/v1/versions/{vid}/approve", headers=approver.headers,
                    json=conditions)
    assert _error(r, 409, "admission_denied")
    attach(0.7563, 400)  # a pass, but older than a year: not evidence
    r = client.post(f"/api/v1/versions/{vid}/admission", headers=steward.headers)
    assert [v["code"] for v in r.get_json()["admission"]["violations"]] == [
        "evaluation_below_threshold"]
    attach(0.7563, 10)
    r = client.post(f"/api/v1/versions/{vid}/approve", headers=approver.headers,
                    json=conditions)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["state"] == "approved"
    decided = list_events(EventFilter(action="policy.decide", target_id=vid))
    assert decided[-1].outcome == "success"

    # The evidence reaches the exports: the ML-BOM's model card (validated strictly
    # against CycloneDX 1.6 as it is made) and the evidence pack.
    auditor = make_person("auditor")
    bom = client.get("/api/v1/exports/ml-bom", headers=auditor.headers)
    assert bom.status_code == 200, bom.get_data(as_text=True)[:500]
    [component] = [c for c in bom.get_json()["components"]
                   if c.get("bom-ref") == f"model-version/{vid}"]
    metrics = component["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]
    arc = [m for m in metrics if m["type"] == "acc" and m["slice"].startswith("arc_easy")]
    assert sorted(m["value"] for m in arc) == ["0.4512", "0.7563", "0.7563"]
    assert arc[0]["confidenceInterval"] == {"lowerBound": f"{0.4512 - 1.96 * 0.0088:.6g}",
                                            "upperBound": f"{0.4512 + 1.96 * 0.0088:.6g}"}
    pack = client.get(f"/api/v1/exports/versions/{vid}/evidence", headers=auditor.headers)
    assert pack.status_code == 200
    evaluations = pack.get_json()["evaluations"]
    assert len(evaluations) == 3 and evaluations[0]["metrics"][0]["task"] == "arc_easy"
    page = client.get(f"/api/v1/exports/versions/{vid}/evidence?format=html",
                      headers=auditor.headers).get_data(as_text=True)
    assert "Evaluation evidence" in page and evaluations[2]["sha256"] in page


def test_an_approval_tells_admission_the_data_classes_it_would_allow(version) -> None:  # type: ignore[no-untyped-def]
    """So evidence requirements can name data classes (docs/policy.md); submit and re-run
    decide without them."""
    from charter.registry.models import ModelVersion
    from charter.registry.service import admission_input
    from charter.uow import unit_of_work

    _, vid = version
    with unit_of_work() as session:
        v = session.get(ModelVersion, vid)
        assert "data_classes" not in admission_input(session, v)
        assert admission_input(session, v, ["internal", "restricted"])["data_classes"] == [
            "internal", "restricted"]


def test_a_derived_version_links_its_base_and_is_approved_only_while_it_is(client, version,  # type: ignore[no-untyped-def]
                                                                          make_person) -> None:
    """An adapter names its base as a registered version: base_model filled from it, the
    link checked; admission denies the adapter while its base is not approved."""
    steward, base_id = version
    r = client.get(f"/api/v1/versions/{base_id}", headers=steward.headers)
    model_id = r.get_json()["model_id"]
    url = f"/api/v1/models/{model_id}/versions"
    adapter = {"label": "1.0-lora", "source_revision": REVISION, "derivation": "adapter",
               "base_version_id": base_id, "weight_format": "safetensors",
               "license_declared": "apache-2.0", "license_card": "apache-2.0",
               "storage_region": "eu-west", "hosting_regions": ["eu-west"],
               "files": [{"path": "adapter_model.safetensors", "size": 1, "sha256": "c" * 64}]}
    r = client.post(url, headers=steward.headers, json={**adapter, "derivation": "original"})
    _error(r, 422, "base_version_not_derived")
    r = client.post(url, headers=steward.headers,
                    json={**adapter, "base_model": "Qwen/Qwen2-0.5B"})
    _error(r, 422, "base_version_mismatch")
    r = client.post(url, headers=steward.headers, json={**adapter, "base_version_id": "nope"})
    _error(r, 404, "base_version_not_found")
    r = client.post(url, headers=steward.headers, json=adapter)
    assert r.status_code == 201, r.get_json()
    created = r.get_json()
    assert created["base_version_id"] == base_id
    assert created["base_model"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    r = client.post(f"/api/v1/versions/{created['id']}/submit", headers=steward.headers,
                    json={})
    codes = [v["code"] for v in r.get_json()["admission"]["violations"]]
    assert "base_version_not_approved" in codes and "base_model_unknown" not in codes
    msg = next(v["msg"] for v in r.get_json()["admission"]["violations"]
               if v["code"] == "base_version_not_approved")
    assert msg.startswith("the version this derives from is draft")
