"""The gateway's two-node run (`bench/gateway.py --failover SECONDS`): two TGI stubs in two
regions behind `charter serve`; the eu-central one is killed and started again on its
port every `--kill-every` seconds while threads send requests that either region may take.
Reported side by side: throughput and errors with the node dying, against the same run
with both nodes up; errors split into requests that were on the dying node when it died
(`node_failed`: the first byte may have gone; never retried) and any other (goal: 0).
Also the CPU an attestation costs per probe round: the agent's statement, Charter's check.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import gateway as gw
from results import emit, figure

BODY = json.dumps({"model": "bench", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


def _upstream(port: int, delay_ms: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(gw.HERE), "--role", "upstream", "--spec",
                             json.dumps({"delay_ms": delay_ms, "port": port})],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    json.loads(proc.stdout.readline())
    return proc


def _seed_two(settings: Any, urls: dict[str, str]) -> str:
    """The version, approved for both regions; a node in each; the deployment `bench`."""
    from charter.actor import SYSTEM
    from charter.db import utcnow
    from charter.identity.service import actor_of, create_api_key, create_user
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

    gw._bind_runtime(settings)
    steward, approver, operator = (
        actor_of(create_user(SYSTEM, username=f"bench-{role}", roles=[role]))
        for role in ("steward", "approver", "operator"))
    model = registry.create_model(steward, ModelCreate(
        name="bench-model", publisher="TinyLlama", source_repo=gw.MODEL_ID))
    version = registry.create_version(steward, model.id, VersionSpec(
        label="1", source_revision=gw.MODEL_SHA, weight_format="safetensors",
        files=[FileSpec(path="model.safetensors", size=1, sha256="b" * 64)],
        license_declared="apache-2.0", license_card="apache-2.0", derivation="original",
        datasets=["d"], storage_region="eu-central", hosting_regions=["eu-central", "eu-west"]))
    registry.submit_version(steward, version.id, Transition())
    registry.approve_version(approver, version.id, ApprovalConditions.model_validate_json(
        json.dumps({"allowed_regions": ["eu-central", "eu-west"],
                    "allowed_data_classes": ["internal"], "allowed_purposes": ["assistant"],
                    "expires_at": (utcnow() + timedelta(days=30)).isoformat()})))
    team = create_team(SYSTEM, name="bench", description="", requests_per_day=10**9,
                       entitlements={"models": ["*"], "data_classes": ["*"], "regions": ["*"]},
                       default_data_class="internal")
    bot = create_service_account(SYSTEM, team.id, username="bench-bot")
    ids = []
    for region, url in urls.items():
        node = nodes.register_node(operator, settings, name=region, base_url=url,
                                   region=region, engine="tgi", labels={}, capacity=512)
        assert nodes.probe_node(settings, node.id).routable, region
        ids.append(node.id)
    nodes.create_deployment(operator, serving_name="bench", version_id=version.id,
                            node_ids=ids)
    return create_api_key(SYSTEM, bot.id, name="bench").token


def _load(port: int, key: str, conc: int, seconds: float) -> dict[str, Any]:
    stop = time.monotonic() + seconds
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop:
            try:
                conn.request("POST", "/v1/chat/completions", BODY, headers)
                resp = conn.getresponse()
                body = resp.read()
                code = "ok" if resp.status == 200 else str(
                    json.loads(body).get("error", {}).get("code") or resp.status)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                code = f"client: {type(exc).__name__}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            with lock:
                codes[code] += 1

    threads = [threading.Thread(target=run) for _ in range(conc)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    total = sum(codes.values())
    return {"requests": total, "rps": total / elapsed, "codes": dict(codes)}


def _attestation_cost(settings: Any, rounds: int = 200) -> dict[str, float]:
    """CPU of one attestation: the agent's statement (model files already hashed) and
    Charter's check of it (key, signature, nonce, every pinned digest)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from charter.nodes import statement
    from charter.nodes.agent import Agent, ModelFiles

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(6):  # weights shards, config, tokenizer: a typical directory
            (root / f"file-{i}.safetensors").write_bytes(os.urandom(1 << 20))
        key = Ed25519PrivateKey.generate()
        agent = Agent(key, ModelFiles(root), node="n", engine="tgi", engine_version="x")
        pinned = [statement.Pinned(f["path"], f["size"], f["sha256"])
                  for f in agent.files.listing()]
        raw = statement.parse_public_key(statement.public_key_text(key))
        started = time.process_time()
        answers = [agent.answer(f"{i:032x}") for i in range(rounds)]
        agent_ms = (time.process_time() - started) * 1000 / rounds
        started = time.process_time()
        for i, answer in enumerate(answers):
            found = statement.verify(answer, raw, f"{i:032x}")
            assert not statement.mismatches(found["files"], pinned)
        check_ms = (time.process_time() - started) * 1000 / rounds
    return {"agent_ms": agent_ms, "check_ms": check_ms, "files": 6}


def run_failover(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from charter.settings import Settings

    console = Console(width=140)
    name = f"charter_bench_fo_{os.getpid()}"
    ports = {"eu-central": gw._free_port(), "eu-west": gw._free_port()}
    ups = {r: _upstream(p, args.token_delay_ms) for r, p in ports.items()}
    charter = None
    created = False
    try:
        database_url = gw._create_database(name)
        created = True
        settings = Settings.from_env({}, database_url=database_url, secret_key=gw.SECRET,
                                     node_allowed_networks="127.0.0.0/8", log_level="WARNING")
        key = _seed_two(settings, {r: f"http://127.0.0.1:{p}" for r, p in ports.items()})
        port = gw._free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
        env.update(CHARTER_DATABASE_URL=database_url, CHARTER_SECRET_KEY=gw.SECRET,
                   CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="ERROR",
                   CHARTER_NODE_PROBE_INTERVAL_S="1")
        charter = subprocess.Popen(
            [str(gw.BIN / "charter"), "serve", "--bind", f"127.0.0.1:{port}", "--workers",
             str(args.workers), "--threads", "64"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gw._wait_http(port, "/healthz", charter)
        conc = 16
        steady = _load(port, key, conc, args.failover)
        kills = 0
        stop = threading.Event()

        def killer() -> None:
            nonlocal kills
            while not stop.wait(args.kill_every):
                gw._stop(ups["eu-central"])
                kills += 1
                if stop.wait(args.kill_every / 2):
                    break
                ups["eu-central"] = _upstream(ports["eu-central"], args.token_delay_ms)

        thread = threading.Thread(target=killer)
        thread.start()
        dying = _load(port, key, conc, args.failover)
        stop.set()
        thread.join()
        from charter.audit.service import EventFilter, list_events

        suspects = len(list_events(EventFilter(action="node.suspect", limit=10_000)))
        returns = len([e for e in list_events(EventFilter(action="node.health", limit=10_000))
                       if e.details.get("healthy")])
        cost = _attestation_cost(settings)
    finally:
        gw._stop(charter)
        for proc in ups.values():
            gw._stop(proc)
        if created:
            gw._drop_database(name)

    def others(codes: dict[str, int]) -> int:
        return sum(n for c, n in codes.items() if c not in ("ok", "node_failed"))

    table = Table(title=f"two nodes, two regions, {conc} clients, {args.failover:g} s each "
                  f"(eu-central killed every {args.kill_every:g} s, {kills} kills)")
    for column in ("run", "requests", "req/s", "on the dying node", "other errors", "codes"):
        table.add_column(column, justify="right")
    for label, r in (("both nodes up", steady), ("one node dying", dying)):
        table.add_row(label, f"{r['requests']:,}", f"{r['rps']:,.0f}",
                      str(r["codes"].get("node_failed", 0)), str(others(r["codes"])),
                      json.dumps(r["codes"]))
    console.print(table)
    console.print(f"the dying node was marked suspect {suspects} times and came back after "
                  f"a probe {returns} times")
    console.print(f"throughput with a node dying / both up: {dying['rps'] / steady['rps']:.2f}x;"
                  f" errors other than requests on the dying node: {others(dying['codes'])}"
                  f" (goal 0)")
    console.print(f"attestation per probe round, one node, {cost['files']} files: agent "
                  f"statement {cost['agent_ms']:.3f} ms CPU, Charter's check "
                  f"{cost['check_ms']:.3f} ms CPU")
    emit("failover", [
        figure("throughput, a node dying", dying["rps"], "req/s", baseline="both up",
               baseline_value=steady["rps"]),
        figure("errors not on the dying node", others(dying["codes"]), "requests",
               goal="0", met=others(dying["codes"]) == 0),
        figure("attestation check", cost["check_ms"], "ms CPU/round",
               baseline="agent statement", baseline_value=cost["agent_ms"]),
    ], kills=kills, clients=conc, suspects=suspects, returns=returns)
