"""Helpers for tests that run a real server process: a free port, waiting until it
answers (or failing with its log when it exits or takes too long), a Redis of a test's
own, and `charter serve` on a test's database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(proc: subprocess.Popen[Any], url: str, log: Path, what: str,
                  timeout_s: float = 60) -> None:
    """Until GET `url` answers 200; fail with the end of `log` if `proc` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not up within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def wait_for_port(port: int, timeout_s: float = 30) -> None:
    """Until something accepts connections on 127.0.0.1:`port` (a server whose routes a
    test makes up itself, with no health path to ask)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)


class RedisServer:
    """A Redis of this test's own (nothing on disk), so it can be stopped and started."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                             check=False).stdout.strip() != b"PONG":
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)


def charter_serve(database_url: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`charter serve` (2 workers, 4 threads each) on `database_url`, up; and its URL."""
    from tests.conftest import SECRET

    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHARTER_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(CHARTER_DATABASE_URL=database_url, CHARTER_SECRET_KEY=SECRET,
               CHARTER_LOG_LEVEL="WARNING", CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "charter"), "serve",
                                 "--bind", f"127.0.0.1:{port}", "--workers", "2",
                                 "--threads", "4"], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url + "/healthz", log, "charter serve")
    except BaseException:
        proc.kill()
        raise
    return proc, url
