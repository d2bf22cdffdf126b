"""A LoRA adapter served for real: the tiny model and a PEFT adapter of it imported as two
versions (the adapter linked to its base), approved; a dev node loading both (`--adapter
support=DIR`), a `charter node agent` stating both by digest; Charter under `charter
serve`, reached with the official openai client and huggingface_hub's InferenceClient.
The adapter's answers are the node's own for that adapter, not the base's; revoking the
base suspends the adapter at once."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from charter.db import utcnow
from tests.conftest import SECRET
from tests.e2e.test_llamacpp import BIN, _spawn
from tests.processes import free_port, wait_until_up

PROMPT = "The quick brown fox"


@dataclasses.dataclass
class World:
    charter: str
    node: str
    key: str
    base_id: str
    adapter_id: str


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    from charter.devnode.tinymodel import build_tiny_adapter, build_tiny_model

    root = tmp_path_factory.mktemp("lora")
    base = build_tiny_model(root / "base")
    return base, build_tiny_adapter(root / "support", base)


@pytest.fixture
def world(dirs, configured, make_person, tmp_path) -> Iterator[World]:  # type: ignore[no-untyped-def]
    from charter.actor import SYSTEM
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team
    from charter.nodes import service as nodes
    from charter.registry import service as registry
    from charter.registry.importer import ImportOptions, content_revision, import_directory
    from charter.registry.schemas import ApprovalConditions, Transition

    base_dir, adapter_dir = dirs
    steward, approver = make_person("steward"), make_person("approver")
    conditions = ApprovalConditions.model_validate_json(json.dumps({
        "allowed_regions": ["eu-central"], "allowed_data_classes": ["internal"],
        "allowed_purposes": ["assistant"],
        "expires_at": (utcnow() + timedelta(days=30)).isoformat()}))
    regions: dict[str, Any] = {"storage_region": "eu-central",
                               "hosting_regions": ("eu-central",)}
    base, _ = import_directory(steward.actor, base_dir, ImportOptions(
        model_name="charter-tiny-llama", label="0.1", publisher="charter",
        source_repo="charter/tiny-llama", source_revision=content_revision(base_dir),
        license_declared="apache-2.0", derivation="original", **regions))
    registry.submit_version(steward.actor, base.id, Transition())
    registry.approve_version(approver.actor, base.id, conditions)
    adapter, _ = import_directory(steward.actor, adapter_dir, ImportOptions(
        model_name="charter-tiny-support", label="0.1", publisher="charter",
        source_repo="charter/tiny-support", source_revision=content_revision(adapter_dir),
        license_declared="apache-2.0", base_version_id=base.id, **regions))
    assert (adapter.derivation, adapter.base_model) == ("adapter", "charter/tiny-llama")
    registry.submit_version(steward.actor, adapter.id, Transition())
    registry.approve_version(approver.actor, adapter.id, conditions)

    procs: list[Any] = []
    try:
        node_port, agent_port, port = free_port(), free_port(), free_port()
        procs.append(_spawn([str(BIN / "charter"), "node", "serve", "--model", str(base_dir),
                             "--region", "eu-central", "--port", str(node_port),
                             "--model-id", "/data/models/tiny", "--adapter",
                             f"support={adapter_dir}"], tmp_path / "node.log"))
        node_url = f"http://127.0.0.1:{node_port}"
        wait_until_up(procs[-1], node_url + "/health", tmp_path / "node.log", "the dev node",
                      timeout_s=120)
        key_path = tmp_path / "agent.pem"
        public = subprocess.run([str(BIN / "charter"), "node", "agent", "keygen", "--key",
                                 str(key_path)], capture_output=True, text=True,
                                check=True).stdout.strip()
        procs.append(_spawn([str(BIN / "charter"), "node", "agent", "serve", "--model",
                             str(base_dir), "--adapter", f"support={adapter_dir}", "--key",
                             str(key_path), "--node", "gpu", "--engine", "tgi", "--port",
                             str(agent_port)], tmp_path / "agent.log"))
        wait_until_up(procs[-1], f"http://127.0.0.1:{agent_port}/health",
                      tmp_path / "agent.log", "the agent")
        settings = dataclasses.replace(configured, node_allowed_networks="127.0.0.0/8")
        operator = make_person("operator")
        node = nodes.register_node(operator.actor, settings, name="gpu", base_url=node_url,
                                   region="eu-central", engine="tgi", labels={}, capacity=4)
        node = nodes.enroll_agent(operator.actor, settings, node.id,
                                  agent_url=f"http://127.0.0.1:{agent_port}",
                                  agent_key=public, row_version=node.row_version)
        probed = nodes.probe_node(settings, node.id)
        assert probed.attested_version_id == base.id, probed.quarantine_reason
        assert probed.attested_adapters == {adapter.id: "support"}
        for name, version in (("tiny", base), ("tiny-support", adapter)):
            nodes.create_deployment(operator.actor, serving_name=name, version_id=version.id,
                                    node_ids=[node.id])
        team = create_team(SYSTEM, name="apps", description="", requests_per_day=None,
                           entitlements={"models": ["*"], "data_classes": ["*"],
                                         "regions": ["*"]}, default_data_class="internal")
        bot = create_service_account(SYSTEM, team.id, username="apps-bot")
        key = create_api_key(SYSTEM, bot.id, name="e2e").token
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
        env.update(CHARTER_DATABASE_URL=settings.database_url, CHARTER_SECRET_KEY=SECRET,
                   CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="WARNING")
        procs.append(_spawn([str(BIN / "charter"), "serve", "--bind", f"127.0.0.1:{port}",
                             "--workers", "1", "--threads", "8"], tmp_path / "charter.log",
                            env))
        wait_until_up(procs[-1], f"http://127.0.0.1:{port}/healthz",
                      tmp_path / "charter.log", "charter serve")
        yield World(f"http://127.0.0.1:{port}", node_url, key, base.id, adapter.id)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def test_an_adapter_answers_through_charter_as_the_node_serves_it(world: World) -> None:
    from huggingface_hub import InferenceClient
    from openai import OpenAI

    from charter.actor import SYSTEM
    from charter.registry import service as registry
    from charter.registry.schemas import RequiredReason

    direct = {a: httpx.post(f"{world.node}/generate", timeout=60, json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 8,
                                         **({"adapter_id": a} if a else {})}}
    ).json()["generated_text"] for a in (None, "support")}
    assert direct[None] != direct["support"]  # the adapter changes the model

    tgi = InferenceClient(base_url=f"{world.charter}/tgi/tiny-support", api_key=world.key)
    assert tgi.text_generation(PROMPT, max_new_tokens=8) == direct["support"]
    base = InferenceClient(base_url=f"{world.charter}/tgi/tiny", api_key=world.key)
    assert base.text_generation(PROMPT, max_new_tokens=8) == direct[None]
    client = OpenAI(base_url=f"{world.charter}/v1", api_key=world.key)
    ask = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    via_charter = client.completions.create(model="tiny-support", **ask)
    node_itself = OpenAI(base_url=f"{world.node}/v1", api_key="x").completions.create(
        model="support", **ask)
    assert via_charter.model == "tiny-support"
    assert via_charter.choices[0].text == node_itself.choices[0].text

    base_version = registry.get_version(world.base_id)
    registry.revoke_version(SYSTEM, world.base_id, RequiredReason(
        reason="the base's weights are withdrawn", row_version=base_version.row_version))
    r = httpx.post(f"{world.charter}/v1/completions", timeout=30, json={
        "model": "tiny-support", **ask}, headers={"Authorization": f"Bearer {world.key}"})
    # refused by the policy; or, when a probe ran in between, the node is quarantined
    # (its files are no approved version's any more) and nothing may serve it at all
    if r.status_code == 503:
        assert r.json()["error"]["code"] == "no_attested_node", r.text
    else:
        assert r.status_code == 403, r.text
        assert r.json()["error"]["message"].endswith(
            f"this version derives from version {world.base_id}, which has been revoked")
