"""`charter demo` as a newcomer runs it: every port checked before anything is done, the
API served by `charter serve` (the production server), the help-desk key chats and a
person's key is told why not, and any stop signal, or the demo's own death, stops every
process it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.processes import free_port

BIN = Path(sys.executable).parent


def _ports_free(port: int) -> bool:
    for p in (port, port + 1, port + 2):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def _base_port() -> int:
    """Three free ports in a row."""
    for _ in range(50):
        port = free_port()
        if port < 65000 and _ports_free(port):
            return port
    raise RuntimeError("no three free ports in a row")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}


def _demo(data_dir: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "charter"), "demo", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())


def _wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def _wait_free(port: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ports_free(port):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return tmp_path_factory.mktemp("demo")


def test_a_busy_port_stops_the_demo_before_it_does_anything(tmp_path: Path) -> None:
    port = _base_port()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        done = subprocess.run(
            [str(BIN / "charter"), "demo", "--port", str(port), "--data-dir",
             str(tmp_path / "d")], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{port + 1}" in out, out
    assert "Traceback" not in out and "seeded" not in out
    assert not (tmp_path / "d").exists()  # nothing was made


@pytest.fixture
def serving(data_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = _base_port()
    proc = _demo(data_dir, port)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_the_demo_serves_with_charter_serve_and_stops_everything_on_sigterm(
        serving: tuple[subprocess.Popen[str], int], data_dir: Path) -> None:
    from openai import OpenAI, PermissionDeniedError

    proc, port = serving
    keys = json.loads((data_dir / "demo-keys.json").read_text())
    base = f"http://127.0.0.1:{port}"
    chat = {"model": "charter-tiny-llama", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hello"}]}
    reply = OpenAI(base_url=f"{base}/v1", api_key=keys["svc-helpdesk"]).chat.completions.create(
        **chat)
    assert reply.model == "charter-tiny-llama"
    with pytest.raises(PermissionDeniedError) as refused:
        OpenAI(base_url=f"{base}/v1", api_key=keys["admin"]).chat.completions.create(**chat)
    assert "belongs to no team" in str(refused.value)
    served = (data_dir / "charter-serve.log").read_text()
    assert "gunicorn" in served.lower() or "Booting worker" in served, served[-2000:]

    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert _wait_free(port), "a process the demo started still holds a port"
    assert "WARNING: This is a development server" not in out
    assert "svc-helpdesk" in out and "the key that chats" in out
    for line in out.splitlines():  # each key on one line, whole
        if line.startswith("admin ") and "chk_" in line:
            assert line.split()[-1] == keys["admin"]


def test_killing_the_demo_takes_its_processes_with_it(
        serving: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = serving
    proc.kill()  # no chance to clean up: the kernel stops its children (PDEATHSIG)
    proc.wait(timeout=30)
    assert _wait_free(port), "the dev nodes or the server outlived the demo"


def test_a_stop_while_seeding_never_leaves_the_demo_half_made(tmp_path: Path) -> None:
    """SIGTERM while the demo seeds: it stops once the seed is whole (keys written), and
    the next run goes on from there."""
    data_dir = tmp_path / "d"
    proc = subprocess.Popen(
        [str(BIN / "charter"), "demo", "--no-serve", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    assert proc.stdout is not None
    for line in proc.stdout:  # the first seeded model: seeding has begun
        if "seeded" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    assert (data_dir / "demo-keys.json").is_file()  # the seed finished before it stopped
    again = subprocess.run(
        [str(BIN / "charter"), "demo", "--no-serve", "--data-dir", str(data_dir)],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "svc-helpdesk" in again.stdout + again.stderr
