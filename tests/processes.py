"""Helpers for tests that run a real server process: a free port, and waiting until it
answers (or failing with its log when it exits or takes too long)."""

from __future__ import annotations

import socket
import subprocess
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
