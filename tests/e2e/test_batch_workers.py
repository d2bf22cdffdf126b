"""Batches with real parts: `charter serve`, `charter worker` and `charter beat` processes,
a real broker (a Redis server of this test's own, or the machine's RabbitMQ), PostgreSQL,
and a real HTTP node. Workers are killed with SIGKILL and the broker is stopped mid-batch;
every line must still be answered exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from charter.audit.service import EventFilter, list_events, verify_chain
from tests.batch_support import BatchWorld, jsonl_lines, make_world, to_jsonl
from tests.conftest import SECRET
from tests.e2e.test_gateway import BIN, free_port, wait_http
from tests.processes import RedisServer

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs redis-server")


@dataclass
class Cluster:
    world: BatchWorld
    env: dict[str, str]
    logs: Path
    charter: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        self.procs[name] = subprocess.Popen([str(BIN / "charter"), *args], env=self.env,
                                            stdout=log, stderr=log, start_new_session=True)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.charter + path, headers=self.world.headers,
                             timeout=30, **kw)

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self.api("GET", f"/v1/batches/{batch_id}").json()  # type: ignore[no-any-return]

    def wait(self, batch_id: str, done: Any, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = self.batch(batch_id)
            if done(body) or time.monotonic() > deadline:
                return body
            time.sleep(0.1)

    def submit(self, n: int) -> str:
        r = self.api("POST", "/v1/files", data={"purpose": "batch"},
                     files={"file": ("in.jsonl", to_jsonl(jsonl_lines(n)))})
        assert r.status_code == 200, r.text
        r = self.api("POST", "/v1/batches", json={
            "input_file_id": r.json()["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})
        assert r.status_code == 200, r.text
        return r.json()["id"]  # type: ignore[no-any-return]

    def output(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        r = self.api("GET", f"/v1/files/{body['output_file_id']}/content")
        return [json.loads(x) for x in r.text.splitlines()]


def _cluster(configured: Any, make_person: Any, tmp_path: Path, broker: str,
             delay_s: float) -> Cluster:
    world = make_world(configured, make_person, capacity=8, delay_s=delay_s)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
    env.update(CHARTER_DATABASE_URL=world.settings.database_url, CHARTER_SECRET_KEY=SECRET,
               CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="WARNING",
               CHARTER_TASK_BACKEND="celery", CHARTER_BROKER_URL=broker,
               CHARTER_TASK_QUEUE=f"charter-e2e-{uuid.uuid4().hex[:8]}",
               CHARTER_BATCH_SWEEP_INTERVAL_S="1", CHARTER_BATCH_LANE_S="5",
               CHARTER_NODE_READ_TIMEOUT_S="5", CHARTER_BATCH_SLOT_WAIT_S="2",
               CHARTER_BATCH_LINE_LEASE_S="10", CHARTER_TASK_VISIBILITY_TIMEOUT_S="15",
               CHARTER_NODE_PROBE_INTERVAL_S="3600")
    cluster = Cluster(world, env, tmp_path)
    port = free_port()
    cluster.start("serve", "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1",
                  "--threads", "16")
    cluster.charter = f"http://127.0.0.1:{port}"
    wait_http(cluster.charter + "/healthz", cluster.procs["serve"])
    cluster.start("worker", "worker", "--concurrency", "8", "--loglevel", "WARNING")
    cluster.start("beat", "beat", "--schedule-file", str(tmp_path / "beat"), "--loglevel",
                  "WARNING")
    return cluster


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


@pytest.fixture
def cluster(configured, make_person, tmp_path, redis) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    c = _cluster(configured, make_person, tmp_path, redis.url, delay_s=0.03)
    yield c
    c.stop_all()
    c.world.node.stop()


def _line_attempts(batch_id: str) -> dict[str, int]:
    decisions = list_events(EventFilter(action="policy.decide", target_id="m", limit=100_000))
    counts: dict[str, int] = {}
    for d in decisions:
        if "batch_id" not in d.details and d.request_id:
            continue  # an online request (the broker test sends some)
        assert d.details["batch_id"] == batch_id
        counts[d.details["custom_id"]] = counts.get(d.details["custom_id"], 0) + 1
    return counts


def _assert_each_line_once(cluster: Cluster, body: dict[str, Any], n: int) -> set[str]:
    """Every line answered once in the output; returns the lines whose attempt was
    interrupted (the only ones that may have reached the node twice)."""
    assert body["status"] == "completed", body
    assert body["request_counts"] == {"total": n, "completed": n, "failed": 0}
    out = cluster.output(body)
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(n))
    for o in out:
        i = o["custom_id"].split("-")[1]
        assert o["response"]["body"]["choices"][0]["message"]["content"] == f"echo: line-{i}"
    interrupted = {e.details["custom_id"] for e in list_events(
        EventFilter(action="batch.line_interrupted", limit=100_000))}
    hits = {k: v for k, v in cluster.world.node.hits.items() if k.startswith("line-")}
    attempts = _line_attempts(body["id"])  # decisions recorded, per line
    assert set(hits) == {f"line-{i}" for i in range(n)}
    for i in range(n):
        again = f"req-{i}" in interrupted
        # Never sent without a recorded decision; decided again only after an interruption.
        assert 1 <= hits[f"line-{i}"] <= attempts[f"req-{i}"] <= 1 + again, (
            i, hits[f"line-{i}"], attempts[f"req-{i}"], again)
    # An outcome for every answer the node gave: one a line, or two where the worker died
    # after the first attempt's outcome was committed and before its answer was stored
    # (the attempt did happen; the line ran again, see lanes._finish).
    outcomes: dict[str, int] = {}
    for o in list_events(EventFilter(action="dispatch.outcome", target_id="m", limit=100_000)):
        if "custom_id" in o.details:
            outcomes[o.details["custom_id"]] = outcomes.get(o.details["custom_id"], 0) + 1
    assert set(outcomes) == {f"req-{i}" for i in range(n)}
    for i in range(n):
        assert 1 <= outcomes[f"req-{i}"] <= hits[f"line-{i}"], (
            i, outcomes[f"req-{i}"], hits[f"line-{i}"])
    assert verify_chain().ok
    return interrupted


def test_the_openai_client_runs_a_batch_on_celery_workers(cluster) -> None:  # type: ignore[no-untyped-def]
    from openai import OpenAI

    client = OpenAI(base_url=f"{cluster.charter}/v1", api_key=cluster.world.key)
    uploaded = client.files.create(file=("in.jsonl", to_jsonl(jsonl_lines(300))),
                                   purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "e2e"})
    assert batch.status in ("validating", "in_progress")
    deadline = time.monotonic() + 90
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 300 and batch.metadata == {"job": "e2e"}
    assert batch.output_file_id and batch.error_file_id is None
    lines = client.files.content(batch.output_file_id).text.splitlines()
    assert len(lines) == 300
    interrupted = _assert_each_line_once(cluster, cluster.batch(batch.id), 300)
    assert interrupted == set()
    assert cluster.world.node.max_in_flight <= 4  # capacity 8 x share 0.5


def test_a_worker_killed_mid_batch_loses_and_repeats_nothing(cluster) -> None:  # type: ignore[no-untyped-def]
    batch_id = cluster.submit(300)
    mid = cluster.wait(batch_id, lambda b: b["request_counts"]["completed"] >= 60)
    assert mid["status"] == "in_progress", mid
    cluster.kill("worker")  # SIGKILL: no ack, no cleanup, lines left running
    time.sleep(1.0)
    stalled = sum(cluster.world.node.hits.values())
    time.sleep(1.0)
    assert sum(cluster.world.node.hits.values()) == stalled  # nobody is working
    assert cluster.batch(batch_id)["request_counts"]["completed"] < 300
    cluster.start("worker", "worker", "--concurrency", "8", "--loglevel", "WARNING")
    body = cluster.wait(batch_id, lambda b: b["status"] != "in_progress")
    interrupted = _assert_each_line_once(cluster, body, 300)
    # The killed worker held lines (so recovery was exercised): at most two per lane (8),
    # the one it ran and the one whose answer waited for its outcome's commit.
    assert 1 <= len(interrupted) <= 2 * 8


def test_the_broker_stopped_and_started_mid_batch_resumes(cluster, redis) -> None:  # type: ignore[no-untyped-def]
    batch_id = cluster.submit(300)
    cluster.wait(batch_id, lambda b: b["request_counts"]["completed"] >= 60)
    redis.kill()  # everything queued is gone with it (it keeps nothing on disk)
    started = time.monotonic()
    # Online dispatch needs no broker: it goes on while Redis is away.
    online = [httpx.post(f"{cluster.charter}/v1/chat/completions", timeout=10,
                         headers=cluster.world.headers,
                         json={"model": "m", "max_tokens": 4, "messages": [
                             {"role": "user", "content": f"online-{i}"}]}).status_code
              for i in range(3)]
    assert online == [200, 200, 200]
    time.sleep(max(0.0, 2.0 - (time.monotonic() - started)))
    redis.start()
    body = cluster.wait(batch_id, lambda b: b["status"] != "in_progress")
    interrupted = _assert_each_line_once(cluster, body, 300)
    assert interrupted == set()


def test_rabbitmq_works_as_the_broker(configured, make_person, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 5672)) != 0:
            pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    cluster = _cluster(configured, make_person, tmp_path,
                       "amqp://guest:guest@127.0.0.1:5672//", delay_s=0.0)
    try:
        batch_id = cluster.submit(40)
        body = cluster.wait(batch_id, lambda b: b["status"] != "in_progress"
                            and b["status"] != "validating")
        _assert_each_line_once(cluster, body, 40)
    finally:
        cluster.stop_all()
        cluster.world.node.stop()


def test_a_cancelled_batch_stops_on_the_workers(cluster) -> None:  # type: ignore[no-untyped-def]
    batch_id = cluster.submit(300)
    cluster.wait(batch_id, lambda b: b["request_counts"]["completed"] >= 30)
    started = time.monotonic()
    r = cluster.api("POST", f"/v1/batches/{batch_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    body = cluster.wait(batch_id, lambda b: b["status"] != "cancelling", timeout=30)
    assert body["status"] == "cancelled" and time.monotonic() - started < 5
    sent = sum(cluster.world.node.hits.values())
    time.sleep(1.5)
    assert sum(cluster.world.node.hits.values()) == sent  # nothing started afterwards
    counts = body["request_counts"]
    assert counts["total"] == 300 and 30 <= counts["completed"] < 300
    assert counts["completed"] + counts["failed"] == 300
    r = cluster.api("GET", f"/v1/files/{body['error_file_id']}/content")
    codes = {json.loads(x)["error"]["code"] for x in r.text.splitlines()}
    assert codes == {"batch_cancelled"}
