"""LoRA adapters served beside their base: the node's agent states the adapter's files by
the name the engine loads it under, Charter attests each approved adapter of the base by
its pinned digests, and a request to the adapter's serving name reaches the engine naming
that adapter (OpenAI's `model`, TGI's `parameters.adapter_id`); nothing else may name one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from charter.actor import SYSTEM
from charter.audit.service import EventFilter, list_events
from charter.nodes import service as nodes
from charter.nodes.agent import Agent, ModelFiles, make_server
from charter.nodes.statement import public_key_text
from tests.batch_support import FakeNode
from tests.console_support import Console
from tests.integration.test_access_matrix import _approved_version, _conditions

WEIGHTS = b"\x00tiny weights\x01" * 1000
CONFIG = b'{"architectures": ["LlamaForCausalLM"]}'
LORA = b"\x02lora A and B\x03" * 100
LORA_CONFIG = b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8}'
CHAT = {"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _adapter_version(steward: Any, base_id: str) -> str:
    from charter.registry import service as registry
    from charter.registry.schemas import ApprovalConditions, FileSpec, Transition, VersionSpec

    base = registry.get_version(base_id)
    version = registry.create_version(steward.actor, base.model_id, VersionSpec(
        label="1-support", source_revision="c" * 40, weight_format="safetensors",
        files=[FileSpec(path="adapter_model.safetensors", size=len(LORA), sha256=_sha(LORA)),
               FileSpec(path="adapter_config.json", size=len(LORA_CONFIG),
                        sha256=_sha(LORA_CONFIG))],
        license_declared="apache-2.0", license_card="apache-2.0", derivation="adapter",
        base_version_id=base_id, datasets=["d"], storage_region="eu-central",
        hosting_regions=["eu-central"]))
    registry.submit_version(steward.actor, version.id, Transition())
    registry.approve_version(SYSTEM, version.id, ApprovalConditions.model_validate_json(
        json.dumps(_conditions({}))))
    return version.id


@dataclasses.dataclass
class World:
    settings: Any
    node: FakeNode
    node_id: str
    base_id: str
    adapter_id: str
    adapter_dir: Path
    headers: dict[str, str]
    app: Any

    @property
    def client(self) -> Any:
        return self.app.test_client()


@pytest.fixture
def world(configured, make_person, tmp_path) -> Iterator[World]:  # type: ignore[no-untyped-def]
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team
    from tests.runtimes import app_for

    model, adapter = tmp_path / "model", tmp_path / "support"
    model.mkdir()
    adapter.mkdir()
    (model / "model.safetensors").write_bytes(WEIGHTS)
    (model / "config.json").write_bytes(CONFIG)
    (adapter / "adapter_model.safetensors").write_bytes(LORA)
    (adapter / "adapter_config.json").write_bytes(LORA_CONFIG)
    settings = dataclasses.replace(configured, node_allowed_networks="127.0.0.0/8")
    steward = make_person("steward")
    base_id = _approved_version(steward, 1, name="tiny", files=[
        ("model.safetensors", len(WEIGHTS), _sha(WEIGHTS)),
        ("config.json", len(CONFIG), _sha(CONFIG))])
    adapter_id = _adapter_version(steward, base_id)
    node = FakeNode("/data/models/tiny", None).start()  # an air-gapped TGI
    key = Ed25519PrivateKey.generate()
    agent = make_server(Agent(key, ModelFiles(model), node="n1", engine="tgi",
                              engine_version="3.3.6",
                              adapters={"support": ModelFiles(adapter)}), "127.0.0.1", 0)
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    try:
        registered = nodes.register_node(SYSTEM, settings, name="n1", region="eu-central",
                                         base_url=node.url, engine="tgi", labels={},
                                         capacity=4)
        nodes.enroll_agent(SYSTEM, settings, registered.id,
                           agent_url=f"http://127.0.0.1:{agent.server_address[1]}",
                           agent_key=public_key_text(key), row_version=registered.row_version)
        team = create_team(SYSTEM, name="t", description="", requests_per_day=None,
                           entitlements={"models": ["*"], "data_classes": ["*"],
                                         "regions": ["*"]},
                           default_data_class="internal")
        bot = create_service_account(SYSTEM, team.id, username="bot")
        headers = {"Authorization": f"Bearer {create_api_key(SYSTEM, bot.id, name='k').token}"}
        yield World(settings, node, registered.id, base_id, adapter_id, adapter, headers,
                    app_for(settings))
    finally:
        node.stop()
        agent.shutdown()
        agent.server_close()


def test_an_adapter_is_attested_and_named_to_the_engine(world: World, make_person) -> None:  # type: ignore[no-untyped-def]
    node = nodes.probe_node(world.settings, world.node_id)
    assert (node.attestation, node.attested_version_id) == ("attested", world.base_id)
    assert node.attested_adapters == {world.adapter_id: "support"}
    attested = list_events(EventFilter(action="node.attest"))[-1]
    assert attested.details["attested_adapters"] == {world.adapter_id: "support"}
    nodes.create_deployment(SYSTEM, serving_name="tiny", version_id=world.base_id,
                            node_ids=[world.node_id])
    nodes.create_deployment(SYSTEM, serving_name="tiny-support", version_id=world.adapter_id,
                            node_ids=[world.node_id])
    c, h = world.client, world.headers

    r = c.post("/v1/chat/completions", headers=h, json={**CHAT, "model": "tiny-support"})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["model"] == "tiny-support"
    assert world.node.bodies[-1] == ("/v1/chat/completions", {**CHAT, "model": "support"})
    r = c.post("/tgi/tiny-support/generate", headers=h,
               json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert world.node.bodies[-1] == ("/generate", {
        "inputs": "hi", "parameters": {"max_new_tokens": 2, "adapter_id": "support"}})
    r = c.post("/v1/chat/completions", headers=h, json={**CHAT, "model": "tiny"})
    assert r.status_code == 200
    assert world.node.bodies[-1][1]["model"] == "/data/models/tiny"  # the base, as loaded
    r = c.post("/tgi/tiny/generate", headers=h, json={"inputs": "hi"})
    assert "adapter_id" not in json.dumps(world.node.bodies[-1][1])
    outcomes = list_events(EventFilter(action="dispatch.outcome", target_id="tiny-support"))
    assert len(outcomes) == 2 and all(o.outcome == "success" for o in outcomes)

    # a caller may not pick an adapter the registry never approved by naming it itself
    sent = len(world.node.bodies)
    r = c.post("/tgi/tiny/generate", headers=h,
               json={"inputs": "hi", "parameters": {"adapter_id": "support"}})
    assert r.status_code == 422 and r.get_json()["error_type"] == "adapter_id_not_allowed"
    assert len(world.node.bodies) == sent
    refused = list_events(EventFilter(action="dispatch.refused", target_id="tiny"))[-1]
    assert refused.details["code"] == "adapter_id_not_allowed"
    # nor through the fields other engines read (llama.cpp's lora, SGLang's lora_path...)
    for field, value in (("lora", [{"id": 0, "scale": 1}]), ("lora_path", "support"),
                         ("adapter_id", "support"), ("lora_request", {"lora_name": "x"})):
        r = c.post("/v1/chat/completions", headers=h,
                   json={**CHAT, "model": "tiny", field: value})
        assert r.status_code == 400, (field, r.get_data(as_text=True))
        assert r.get_json()["error"]["code"] == "adapter_id_not_allowed"
    r = c.post("/v1/embeddings", headers=h, json={"model": "tiny", "input": "x", "lora": []})
    assert r.get_json()["error"]["code"] == "adapter_id_not_allowed"
    assert len(world.node.bodies) == sent
    from charter.batches.jsonl import check_line

    line = check_line(1, json.dumps({"custom_id": "a", "method": "POST",
                                     "url": "/v1/chat/completions",
                                     "body": {**CHAT, "model": "tiny", "lora_path": "x"}}),
                      set(), 100)
    assert line.error_code == "adapter_id_not_allowed"

    page = Console(world.app, make_person("operator").actor.user_id).get("/console/nodes").text
    assert (f'<code>support</code> (<a href="/console/versions/{world.adapter_id}">tiny '
            '1-support</a>)') in page


def test_an_adapter_whose_files_changed_is_not_served(world: World) -> None:
    nodes.probe_node(world.settings, world.node_id)
    nodes.create_deployment(SYSTEM, serving_name="tiny", version_id=world.base_id,
                            node_ids=[world.node_id])
    nodes.create_deployment(SYSTEM, serving_name="tiny-support", version_id=world.adapter_id,
                            node_ids=[world.node_id])
    (world.adapter_dir / "adapter_model.safetensors").write_bytes(LORA + b"tampered")
    node = nodes.probe_node(world.settings, world.node_id)
    assert (node.attestation, node.attested_adapters) == ("attested", {})  # the base still
    r = world.client.post("/v1/chat/completions", headers=world.headers,
                          json={**CHAT, "model": "tiny-support"})
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "no_attested_node"
    r = world.client.post("/v1/chat/completions", headers=world.headers,
                          json={**CHAT, "model": "tiny"})
    assert r.status_code == 200
    (world.adapter_dir / "adapter_model.safetensors").write_bytes(LORA)
    node = nodes.probe_node(world.settings, world.node_id)
    assert node.attested_adapters == {world.adapter_id: "support"}
    r = world.client.post("/v1/chat/completions", headers=world.headers,
                          json={**CHAT, "model": "tiny-support"})
    assert r.status_code == 200


def test_an_engine_without_lora_attests_no_adapter(world: World) -> None:
    """llama.cpp's server loads adapters at start, not per request: its agent's adapters
    are not served as versions of their own."""
    from charter.nodes.models import Node
    from charter.uow import unit_of_work

    assert nodes.probe_node(world.settings, world.node_id).attested_adapters
    with unit_of_work() as session:
        session.get(Node, world.node_id).engine = "llamacpp"  # type: ignore[union-attr]
    node = nodes.probe_node(world.settings, world.node_id)
    assert (node.healthy, node.attested_version_id) == (True, world.base_id)
    assert node.attested_adapters == {}
