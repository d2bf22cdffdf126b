"""A derived version (an adapter, a quantized build) served while its base is approved,
suspended at dispatch the moment its base is revoked (audited, in the caller's protocol),
and its lineage shown in the console, the evidence pack and the ML-BOM's pedigree."""

from __future__ import annotations

import dataclasses
import json

from charter.actor import SYSTEM
from charter.audit.service import EventFilter, list_events
from tests.batch_support import FakeNode
from tests.console_support import Console
from tests.integration.test_access_matrix import _approved_version, _conditions

CHAT = {"model": "lora", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def _adapter(steward, base_id: str) -> str:  # type: ignore[no-untyped-def]
    from charter.registry import service as registry
    from charter.registry.schemas import ApprovalConditions, FileSpec, Transition, VersionSpec

    base = registry.get_version(base_id)
    version = registry.create_version(steward.actor, base.model_id, VersionSpec(
        label="1-lora", source_revision="c" * 40, weight_format="safetensors",
        files=[FileSpec(path="adapter_model.safetensors", size=1, sha256="d" * 64)],
        license_declared="apache-2.0", license_card="apache-2.0", derivation="adapter",
        base_version_id=base_id, datasets=["d"], storage_region="eu-central",
        hosting_regions=["eu-central"]))
    registry.submit_version(steward.actor, version.id, Transition())
    conditions = ApprovalConditions.model_validate_json(json.dumps(_conditions({})))
    registry.approve_version(SYSTEM, version.id, conditions)
    return version.id


def test_revoking_a_base_suspends_its_adapter_at_dispatch(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team
    from charter.nodes import service as nodes
    from charter.registry import service as registry
    from charter.registry.schemas import RequiredReason
    from tests.runtimes import app_for

    steward = make_person("steward")
    base_id = _approved_version(steward, 1, name="base-1")
    adapter_id = _adapter(steward, base_id)
    adapter = registry.get_version(adapter_id)
    assert adapter.state == "approved" and adapter.base_model == "x/base-1"
    node = FakeNode(adapter.model.source_repo, adapter.source_revision).start()
    try:
        settings = dataclasses.replace(configured, node_allowed_networks="127.0.0.0/8")
        registered = nodes.register_node(SYSTEM, settings, name="n1", region="eu-central",
                                         base_url=node.url, engine="tgi", labels={},
                                         capacity=4)
        assert nodes.probe_node(settings, registered.id).attested_version_id == adapter_id
        nodes.create_deployment(SYSTEM, serving_name="lora", version_id=adapter_id,
                                node_ids=[registered.id])
        team = create_team(SYSTEM, name="t", description="", requests_per_day=None,
                           entitlements={"models": ["*"], "data_classes": ["*"],
                                         "regions": ["*"]},
                           default_data_class="internal")
        bot = create_service_account(SYSTEM, team.id, username="bot")
        headers = {"Authorization": f"Bearer {create_api_key(SYSTEM, bot.id, name='k').token}"}
        app = app_for(settings)
        client = app.test_client()

        r = client.post("/v1/chat/completions", headers=headers, json=CHAT)
        assert r.status_code == 200, r.get_data(as_text=True)[:300]
        served = sum(node.hits.values())

        base = registry.get_version(base_id)
        registry.revoke_version(SYSTEM, base_id, RequiredReason(
            reason="weights withdrawn by the publisher", row_version=base.row_version))
        revoked = list_events(EventFilter(action="version.revoke", target_id=base_id))[-1]
        assert revoked.details["derivatives_suspended"] == [adapter_id]
        assert registry.get_version(adapter_id).state == "approved"  # its own state kept

        r = client.post("/v1/chat/completions", headers=headers, json=CHAT)
        assert r.status_code == 403, r.get_data(as_text=True)[:300]
        error = r.get_json()["error"]
        assert error["code"] == "policy_denied"
        assert error["message"] == ("policy denies this request: this version derives from "
                                    f"version {base_id}, which has been revoked")
        assert sum(node.hits.values()) == served  # nothing reached the node
        refused = list_events(EventFilter(action="dispatch.refused", target_id="lora"))[-1]
        assert refused.details["violations"] == ["base_version_revoked"]
        decided = list_events(EventFilter(action="policy.decide", limit=1000))[-1]
        assert decided.details["allow"] is False
        assert decided.details["violations"] == ["base_version_revoked"]

        # TGI's clients hear it in TGI's shape
        r = client.post("/tgi/lora/generate", headers=headers,
                        json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 403 and r.get_json()["error_type"] == "policy_denied"

        # the lineage, wherever a person or an auditor looks
        auditor = make_person("auditor")
        pack = client.get(f"/api/v1/exports/versions/{adapter_id}/evidence",
                          headers=auditor.headers).get_json()
        assert [(a["version_id"], a["state"]) for a in pack["lineage"]["ancestors"]] == [
            (base_id, "revoked")]
        base_pack = client.get(f"/api/v1/exports/versions/{base_id}/evidence",
                               headers=auditor.headers).get_json()
        assert [d["version_id"] for d in base_pack["lineage"]["derivatives"]] == [adapter_id]
        html = client.get(f"/api/v1/exports/versions/{adapter_id}/evidence?format=html",
                          headers=auditor.headers).get_data(as_text=True)
        assert "this version is suspended at dispatch" in html

        bom = client.get("/api/v1/exports/ml-bom?include_retired=true",
                         headers=auditor.headers).get_json()
        component = next(c for c in bom["components"]
                         if c["bom-ref"] == f"model-version/{adapter_id}")
        ancestor = component["pedigree"]["ancestors"][0]
        assert ancestor["name"] == "base-1" and ancestor["version"] == "1"
        assert ancestor["hashes"] == [{"alg": "SHA-256", "content": "b" * 64}]
        props = {p["name"]: p["value"] for p in ancestor["properties"]}
        assert props["charter:version_id"] == base_id and props["charter:state"] == "revoked"
        depends = next(d for d in bom["dependencies"]
                       if d["ref"] == f"model-version/{adapter_id}")
        assert depends["dependsOn"] == [f"model-version/{base_id}"]

        page = Console(app, steward.actor.user_id).get(f"/console/versions/{adapter_id}").text
        assert f'href="/console/versions/{base_id}">base-1 1</a>' in page
        assert "(this version is suspended at dispatch)" in page
        page = Console(app, steward.actor.user_id).get(f"/console/versions/{base_id}").text
        assert f'href="/console/versions/{adapter_id}">base-1 1-lora</a>' in page
    finally:
        node.stop()


def test_a_base_whose_approval_ran_out_suspends_its_adapter_before_the_sweep(  # type: ignore[no-untyped-def]
        configured, make_person) -> None:
    """The base's approval ends (its state still approved until the expiry sweep runs):
    the adapter is refused from that second, base_approval_expired."""
    from datetime import timedelta

    from sqlalchemy import update

    from charter.db import utcnow
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team
    from charter.nodes import service as nodes
    from charter.registry import service as registry
    from charter.registry.models import ApprovalDecision
    from charter.uow import unit_of_work
    from tests.runtimes import app_for

    steward = make_person("steward")
    base_id = _approved_version(steward, 1, name="base-1")
    adapter_id = _adapter(steward, base_id)
    adapter = registry.get_version(adapter_id)
    node = FakeNode(adapter.model.source_repo, adapter.source_revision).start()
    try:
        settings = dataclasses.replace(configured, node_allowed_networks="127.0.0.0/8")
        registered = nodes.register_node(SYSTEM, settings, name="n1", region="eu-central",
                                         base_url=node.url, engine="tgi", labels={},
                                         capacity=4)
        nodes.probe_node(settings, registered.id)
        nodes.create_deployment(SYSTEM, serving_name="lora", version_id=adapter_id,
                                node_ids=[registered.id])
        team = create_team(SYSTEM, name="t", description="", requests_per_day=None,
                           entitlements={"models": ["*"], "data_classes": ["*"],
                                         "regions": ["*"]}, default_data_class="internal")
        bot = create_service_account(SYSTEM, team.id, username="bot")
        headers = {"Authorization": f"Bearer {create_api_key(SYSTEM, bot.id, name='k').token}"}
        client = app_for(settings).test_client()
        assert client.post("/v1/chat/completions", headers=headers, json=CHAT).status_code == 200
        with unit_of_work() as session:  # the base's approval ran out a minute ago
            session.execute(update(ApprovalDecision).where(
                ApprovalDecision.version_id == base_id).values(
                expires_at=utcnow() - timedelta(minutes=1)))
        assert registry.get_version(base_id).state == "approved"  # the sweep has not run
        r = client.post("/v1/chat/completions", headers=headers, json=CHAT)
        assert r.status_code == 403, r.get_data(as_text=True)
        assert f"derives from version {base_id}, whose approval expired at" in (
            r.get_json()["error"]["message"])
        refused = list_events(EventFilter(action="dispatch.refused", target_id="lora"))[-1]
        assert refused.details["violations"] == ["base_approval_expired"]
    finally:
        node.stop()
