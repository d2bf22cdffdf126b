"""An engine no one here wrote, for real: llama.cpp's server (llama-cpp-python, compiled from
its sdist at install) serving a GGUF that this test writes from the tiny local model,
attested by a `charter node agent` process over the GGUF's digest, registered as a
`llamacpp` node, and reached through `charter serve` with the official openai client."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from charter.audit.service import EventFilter, list_events
from charter.db import utcnow
from tests.conftest import SECRET
from tests.gguf_support import write_gguf
from tests.processes import free_port, wait_until_up

BIN = Path(sys.executable).parent


@dataclasses.dataclass
class World:
    charter: str
    key: str
    gguf: Path


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> Any:
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


@pytest.fixture
def world(configured, make_person, tmp_path) -> Iterator[World]:  # type: ignore[no-untyped-def]
    from charter.actor import SYSTEM
    from charter.devnode.tinymodel import build_tiny_model
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team
    from charter.nodes import service as nodes
    from charter.registry import service as registry
    from charter.registry.schemas import (
        ApprovalConditions,
        FileSpec,
        ModelCreate,
        Transition,
        VersionSpec,
    )

    models = tmp_path / "models"
    models.mkdir()
    gguf = write_gguf(build_tiny_model(tmp_path / "hf"), models / "tiny.gguf")
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    steward = make_person("steward")
    model = registry.create_model(steward.actor, ModelCreate(
        name="tiny-gguf", publisher="charter", source_repo="charter/tiny-gguf"))
    version = registry.create_version(steward.actor, model.id, VersionSpec(
        label="1", source_revision=digest, weight_format="gguf",
        files=[FileSpec(path="tiny.gguf", size=gguf.stat().st_size, sha256=digest)],
        license_declared="apache-2.0", license_card="apache-2.0", derivation="original",
        datasets=["d"], storage_region="eu-central", hosting_regions=["eu-central"]))
    registry.submit_version(steward.actor, version.id, Transition())
    registry.approve_version(SYSTEM, version.id, ApprovalConditions.model_validate_json(
        json.dumps({"allowed_regions": ["eu-central"], "allowed_data_classes": ["internal"],
                    "allowed_purposes": ["assistant"],
                    "expires_at": (utcnow() + timedelta(days=30)).isoformat()})))

    procs: list[Any] = []
    try:
        engine_port, agent_port, port = free_port(), free_port(), free_port()
        procs.append(_spawn([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                             "--host", "127.0.0.1", "--port", str(engine_port),
                             "--n_ctx", "256", "--model_alias", "tiny"],
                            tmp_path / "llama.log"))
        wait_until_up(procs[-1], f"http://127.0.0.1:{engine_port}/v1/models",
                      tmp_path / "llama.log", "llama.cpp's server", timeout_s=120)
        key_path = tmp_path / "agent.pem"
        public = subprocess.run([str(BIN / "charter"), "node", "agent", "keygen", "--key",
                                 str(key_path)], capture_output=True, text=True,
                                check=True).stdout.strip()
        procs.append(_spawn([str(BIN / "charter"), "node", "agent", "serve", "--model",
                             str(models), "--key", str(key_path), "--node", "llama",
                             "--engine", "llamacpp", "--port", str(agent_port)],
                            tmp_path / "agent.log"))
        wait_until_up(procs[-1], f"http://127.0.0.1:{agent_port}/health",
                      tmp_path / "agent.log", "the agent")

        settings = dataclasses.replace(configured, node_allowed_networks="127.0.0.0/8")
        operator = make_person("operator")
        node = nodes.register_node(operator.actor, settings, name="llama",
                                   base_url=f"http://127.0.0.1:{engine_port}",
                                   region="eu-central", engine="llamacpp", labels={},
                                   capacity=2)
        node = nodes.enroll_agent(operator.actor, settings, node.id,
                                  agent_url=f"http://127.0.0.1:{agent_port}",
                                  agent_key=public, row_version=node.row_version)
        probed = nodes.probe_node(settings, node.id)
        assert probed.routable, (probed.attestation, probed.quarantine_reason,
                                 probed.last_error)
        nodes.create_deployment(operator.actor, serving_name="tiny-gguf",
                                version_id=version.id, node_ids=[node.id])
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
        yield World(f"http://127.0.0.1:{port}", key, gguf)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def test_the_openai_client_reaches_llama_cpp_through_charter(world: World) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{world.charter}/v1", api_key=world.key)
    assert [m.id for m in client.models.list()] == ["tiny-gguf"]
    reply = client.completions.create(model="tiny-gguf", prompt="Once upon a time",
                                      max_tokens=4, temperature=0)
    assert reply.model == "tiny-gguf" and isinstance(reply.choices[0].text, str)
    chunks = list(client.completions.create(model="tiny-gguf", prompt="Once upon a time",
                                            max_tokens=4, temperature=0, stream=True))
    assert chunks and {c.model for c in chunks} == {"tiny-gguf"}
    outcomes = list_events(EventFilter(action="dispatch.outcome"))
    assert outcomes and all(o.details["node"] == "llama" for o in outcomes)
