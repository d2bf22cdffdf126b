"""One governed site for end-to-end tests: the tiny model registered and approved, a team
and its key, one dev node, and Charter under `charter serve` with the version's tokenizer
in CHARTER_TOKENIZERS_DIR."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from charter.db import utcnow
from tests.conftest import SECRET
from tests.e2e.test_gateway import BIN, free_port, wait_http


@dataclass
class Site:
    charter: str
    node: str
    key: str
    admin: str
    version_id: str
    tokenizers: Path
    env: dict[str, str]  # what a `charter` command needs to reach this site's database


@contextmanager
def governed_site(model_dir: Path, configured, make_person, tmp_path: Path,  # type: ignore[no-untyped-def]
                  *, counts: bool = True, name: str = "charter-tiny-llama",
                  serving: str = "tiny", engine: str = "tgi",
                  policy_dir: str | None = None) -> Iterator[Site]:
    """`counts=False`: the node reports no token counts (`charter node serve --no-counts`);
    `name`: the model's (its source `charter/<name without charter->`); `serving`: the
    deployment's name; `engine`: what the node is registered as (tgi, or tei for an
    embedding model); `policy_dir`: the policies `charter serve` decides with."""
    import dataclasses

    from charter.actor import SYSTEM
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team
    from charter.nodes import service as nodes
    from charter.registry import service as registry
    from charter.registry.importer import ImportOptions, content_revision, import_directory
    from charter.registry.schemas import ApprovalConditions, Transition

    settings = dataclasses.replace(configured, node_allowed_networks="127.0.0.0/8")
    steward, approver, operator = (make_person("steward"), make_person("approver"),
                                   make_person("operator"))
    revision = content_revision(model_dir)
    version, _ = import_directory(steward.actor, model_dir, ImportOptions(
        model_name=name, label="0.1", publisher="charter",
        source_repo=f"charter/{name.removeprefix('charter-')}", source_revision=revision,
        license_declared="apache-2.0", derivation="original",
        storage_region="eu-central", hosting_regions=("eu-central",)))
    registry.submit_version(steward.actor, version.id, Transition())
    registry.approve_version(approver.actor, version.id, ApprovalConditions.model_validate_json(
        json.dumps({"allowed_regions": ["eu-central"], "allowed_data_classes": ["internal"],
                    "allowed_purposes": ["assistant"],
                    "expires_at": (utcnow() + timedelta(days=30)).isoformat()})))
    team = create_team(SYSTEM, name="apps", description="", requests_per_day=500,
                       entitlements={"models": ["*"], "data_classes": ["*"], "regions": ["*"]},
                       default_data_class="internal")
    bot = create_service_account(SYSTEM, team.id, username="apps-bot")
    key = create_api_key(SYSTEM, bot.id, name="e2e").token

    # The tokenizer files, where an operator puts them: <model name>/<version label>/.
    tokenizers = tmp_path / "tokenizers"
    folder = tokenizers / name / "0.1"
    folder.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)

    port = free_port()
    node_proc = subprocess.Popen(
        [str(BIN / "charter"), "node", "serve", "--model", str(model_dir), "--region",
         "eu-central", "--port", str(port), "--model-id",
         f"charter/{name.removeprefix('charter-')}", "--revision",
         revision, *([] if counts else ["--no-counts"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node_url = f"http://127.0.0.1:{port}"
    try:
        wait_http(node_url + "/health", node_proc, timeout=120)
        node = nodes.register_node(operator.actor, settings, name="quiet", base_url=node_url,
                                   region="eu-central", engine=engine, labels={}, capacity=4)
        nodes.probe_node(settings, node.id)
        nodes.create_deployment(operator.actor, serving_name=serving, version_id=version.id,
                                node_ids=[node.id])
        with charter_serve(settings.database_url, policy_dir=policy_dir,
                           tokenizers=tokenizers) as (charter, env):
            yield Site(charter, node_url, key, make_person("admin").token, version.id,
                       tokenizers, env)
    finally:
        node_proc.kill()
        node_proc.wait(timeout=10)


@contextmanager
def charter_serve(database_url: str, *, policy_dir: str | None = None,
                  tokenizers: Path | None = None,
                  workers: int = 1) -> Iterator[tuple[str, dict[str, str]]]:
    """`charter serve` on a free port over `database_url`: its URL, and its environment."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
    env.update(CHARTER_DATABASE_URL=database_url, CHARTER_SECRET_KEY=SECRET,
               CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="WARNING")
    if tokenizers is not None:
        env["CHARTER_TOKENIZERS_DIR"] = str(tokenizers)
    if policy_dir is not None:
        env["CHARTER_POLICY_DIR"] = policy_dir
    server = subprocess.Popen(
        [str(BIN / "charter"), "serve", "--bind", f"127.0.0.1:{port}", "--workers",
         str(workers), "--threads", "8"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        charter = f"http://127.0.0.1:{port}"
        wait_http(charter + "/healthz", server)
        yield charter, env
    finally:
        server.kill()
        server.wait(timeout=10)
