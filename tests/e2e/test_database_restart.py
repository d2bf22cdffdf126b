"""PostgreSQL restarted under load, with real processes: a PostgreSQL cluster of this test's
own (initdb in a temporary folder, so the machine's server and other test runs are left
alone), a real node, `charter serve`, and clients sending chat completions throughout.

During the outage requests are refused cleanly (503 in OpenAI's error shape, never a 500),
nothing reaches the node without its decision committed to the audit log, Charter recovers
by itself, and the chain verifies afterwards with no gap.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import SECRET
from tests.e2e.test_gateway import BIN, free_port, wait_http

PG_BIN = Path("/usr/lib/postgresql/15/bin")
pytestmark = pytest.mark.skipif(not (PG_BIN / "initdb").exists(), reason="needs PostgreSQL 15")


@dataclasses.dataclass
class Cluster:
    folder: Path
    port: int

    def _ctl(self, *args: str) -> None:
        cmd = [str(PG_BIN / "pg_ctl"), "-D", str(self.folder / "data"), "-w", "-t", "60", *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        # The server inherits pg_ctl's output: never a pipe, or this would wait for it.
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=90)

    def start(self) -> None:
        self._ctl("-l", str(self.folder / "log"), "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off -c max_connections=50", "start")

    def restart(self, down_s: float) -> None:
        """Stop (fast: connections are cut), stay down a while, start again."""
        self._ctl("-m", "fast", "stop")
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        self._ctl("-m", "immediate", "stop")

    def url(self, db: str = "postgres", driver: str = "postgresql") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{db}"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    # Not pytest's tmp_path: its folders are private to root, and the server runs as postgres.
    folder = Path(tempfile.mkdtemp(prefix="charter-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    init = [str(PG_BIN / "initdb"), "-D", str(folder / "data"), "-U", "postgres",
            "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"]
    if os.geteuid() == 0:
        init = ["runuser", "-u", "postgres", "--", *init]
    subprocess.run(init, check=True, capture_output=True, timeout=120)
    c = Cluster(folder, free_port())
    c.start()
    try:
        yield c
    finally:
        try:
            c.stop()
        except subprocess.SubprocessError:
            pass
        shutil.rmtree(folder, ignore_errors=True)


def _person_maker() -> Any:
    from charter.actor import SYSTEM
    from charter.identity.service import actor_of, create_api_key, create_user
    from tests.conftest import Person

    def make(*roles: str, username: str | None = None, kind: str = "user") -> Person:
        user = create_user(SYSTEM, username=username or f"p-{uuid.uuid4().hex[:6]}",
                           kind=kind, roles=list(roles))
        return Person(actor_of(user), create_api_key(SYSTEM, user.id, name="t").token)

    return make


def test_postgres_restarted_under_load(cluster: Cluster) -> None:
    from charter import migrate
    from charter.audit.service import EventFilter, list_events, verify_chain
    from charter.settings import Settings
    from tests.batch_support import make_world
    from tests.runtimes import bind_runtime, release_runtime

    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE charter")
    url = cluster.url("charter", "postgresql+psycopg")
    migrate.upgrade(url)
    settings = Settings.from_env({}, database_url=url, secret_key=SECRET)
    bind_runtime(settings)
    world = make_world(settings, _person_maker())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
    env.update(CHARTER_DATABASE_URL=url, CHARTER_SECRET_KEY=SECRET,
               CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="WARNING",
               CHARTER_DB_POOL_TIMEOUT_S="2", CHARTER_NODE_PROBE_INTERVAL_S="3600")
    server = subprocess.Popen([str(BIN / "charter"), "serve", "--bind", f"127.0.0.1:{port}",
                               "--workers", "1", "--threads", "16"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    charter = f"http://127.0.0.1:{port}"
    results: list[tuple[float, str, int, str | None]] = []  # (time, request id, status, code)
    stop = threading.Event()
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(base_url=charter, timeout=15,
                          headers={"Authorization": f"Bearer {world.key}"}) as http:
            i = 0
            while not stop.is_set():
                rid = f"load-{n}-{i}"
                i += 1
                try:
                    r = http.post("/v1/chat/completions", headers={"X-Request-Id": rid},
                                  json={"model": "m", "max_tokens": 4, "messages": [
                                      {"role": "user", "content": rid}]})
                    status = r.status_code
                    body = r.json()
                    code = body.get("error", {}).get("code") if status != 200 else None
                except httpx.HTTPError as exc:
                    status, code = -1, type(exc).__name__
                with lock:
                    results.append((time.monotonic(), rid, status, code))
                time.sleep(0.01)

    try:
        wait_http(charter + "/healthz", server)
        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        restarted = time.monotonic()
        cluster.restart(down_s=2.0)
        back = time.monotonic()
        time.sleep(8)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        stop.set()
        server.kill()
        server.wait(timeout=10)
        world.node.stop()

    statuses = {s for _, _, s, _ in results}
    assert statuses <= {200, 503}, sorted({(s, c) for _, _, s, c in results if s != 200})
    refusals = {c for _, _, s, c in results if s == 503}
    assert refusals <= {"database_unavailable", "audit_unavailable", "policy_unavailable"}, \
        refusals
    before = [s for t, _, s, _ in results if t < restarted]
    after = [s for t, _, s, _ in results if t > back + 3]
    assert before and set(before) == {200}
    assert after and set(after) == {200}, "Charter did not recover by itself"
    # Nothing reached the node without its decision committed first.
    decided = {e.request_id for e in list_events(EventFilter(
        action="policy.decide", outcome="success", limit=100_000))}
    served = {content for content, count in world.node.hits.items() if count}
    assert served <= decided, sorted(served - decided)[:5]
    assert {rid for _, rid, s, _ in results if s == 200} <= served
    verdict = verify_chain()
    assert verdict.ok, verdict
    release_runtime()
