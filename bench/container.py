"""Benchmark: Charter's image, run as the chart runs it (podman: read-only root, user
10001, every capability dropped), under the gateway benchmark's load, side by side with
`charter serve` as a plain process on the same database and the same fast TGI stub:
throughput at c=32, and memory at rest and at its peak under that load.

    python bench/container.py [--duration 8] [--workers 2]

Needs podman (scripts/services-up installs it) and the image (scripts/build-image, run
here first: its layer cache makes that a few seconds when nothing changed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gateway as gw
from results import emit, figure

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "scripts" / "containers.conf")}
UNITS = {"B": 1 / 2**20, "kB": 1e3 / 2**20, "KiB": 1 / 1024, "MB": 1e6 / 2**20, "MiB": 1.0,
         "GB": 1e9 / 2**20, "GiB": 1024.0}


def podman(*args: str, timeout: float = 600) -> str:
    return subprocess.run(["podman", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, check=True).stdout


def container_mib(cid: str) -> float:
    """What podman reports the container uses (its cgroup's memory)."""
    used = podman("stats", "--no-stream", "--format", "{{.MemUsage}}", cid).split("/")[0]
    found = re.fullmatch(r"\s*([\d.]+)\s*([kKMG]i?B|B)\s*", used)
    if found is None:
        raise RuntimeError(f"podman stats said {used!r}")
    return float(found.group(1)) * UNITS[found.group(2)]


def process_mib(pid: int) -> float:
    """The memory of `charter serve`, its master and every worker, each shared page
    counted once (the proportional set size: what the container's cgroup also counts
    once)."""
    total_kb = 0
    for p in (pid, *gw._children(pid)):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        found = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
        total_kb += int(found.group(1)) if found else 0
    return total_kb / 1024


class Peak:
    """The highest of a reading taken every 0.2 s while the block runs."""

    def __init__(self, read: Callable[[], float]) -> None:
        self.read, self.peak = read, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of c=32 load")
    ap.add_argument("--workers", type=int, default=2, help="as the chart's api.workers")
    ap.add_argument("--threads", type=int, default=256, help="as the chart's api.threads")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    from charter.settings import Settings

    console = Console()
    if shutil.which("podman") is None:
        raise SystemExit("podman is not installed (scripts/services-up installs it)")
    built = subprocess.run(["bash", str(ROOT / "scripts" / "build-image")], env=ENV,
                           capture_output=True, text=True, timeout=1800, check=True)
    image = "localhost/charter:dev"
    digest = built.stdout.strip().splitlines()[-1]
    name = f"charter_bench_ctr_{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-container-"))
    upstream = proc = None
    cid = ""
    try:
        upstream = subprocess.Popen(
            [sys.executable, str(Path(gw.__file__)), "--role", "upstream", "--spec",
             json.dumps({"delay_ms": 10.0})], stdout=subprocess.PIPE, text=True)
        assert upstream.stdout is not None
        up_port = json.loads(upstream.stdout.readline())["port"]
        database_url = gw._create_database(name)
        settings = Settings.from_env({}, database_url=database_url, secret_key=gw.SECRET,
                                     node_allowed_networks="127.0.0.0/8", log_level="WARNING")
        key = gw._seed(settings, f"http://127.0.0.1:{up_port}")
        lua = tmp / "post.lua"
        lua.write_text(gw.WRK_LUA.format(body=gw.BODY.decode(), key=key))
        tool = {"wrk": shutil.which("wrk"), "lua": str(lua), "key": key}
        env = {"CHARTER_DATABASE_URL": database_url, "CHARTER_SECRET_KEY": gw.SECRET,
               "CHARTER_NODE_ALLOWED_NETWORKS": "127.0.0.0/8", "CHARTER_LOG_LEVEL": "WARNING"}
        serve = ["serve", f"--workers={args.workers}", f"--threads={args.threads}"]
        results: dict[str, dict[str, float]] = {}

        port = gw._free_port()
        cid = podman("run", "-d", "--init", "--network", "host", "--user", "10001:10001",
                     "--read-only", "--read-only-tmpfs=false", "--cap-drop=ALL",
                     "--security-opt", "no-new-privileges", "--tmpfs",
                     "/tmp:rw,size=256m,mode=1777",  # noqa: S108 - the container's own tmpfs
                     *(x for k, v in env.items() for x in ("-e", f"{k}={v}")),
                     image, *serve, f"--bind=127.0.0.1:{port}").strip()
        _wait(port)
        results["image"] = _measure(tool, port, args.duration, lambda: container_mib(cid))
        podman("stop", "--time", "30", cid)

        port = gw._free_port()
        proc = subprocess.Popen(
            [str(gw.BIN / "charter"), *serve, f"--bind=127.0.0.1:{port}"],
            env={**{k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")},
                 **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gw._wait_http(port, "/healthz", proc)
        pid = proc.pid
        results["process"] = _measure(tool, port, args.duration, lambda: process_mib(pid))
    finally:
        if cid:
            subprocess.run(["podman", "rm", "-f", cid], env=ENV, capture_output=True,
                           check=False)
        gw._stop(proc)
        gw._stop(upstream)
        gw._drop_database(name)
        shutil.rmtree(tmp, ignore_errors=True)

    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).strip())
    table = Table(title=f"Charter's image ({size / 1e6:.0f} MB, {digest[:19]}...) against "
                        f"`charter serve` as a process: {args.workers} workers, c=32 for "
                        f"{args.duration:g} s to a fast TGI stub")
    for column in ("", "image (podman, as the chart)", "process", "ratio"):
        table.add_column(column, justify="right")
    rows = (("requests/s at c=32", "rps", "{:.0f}"), ("memory at rest, MiB", "rest", "{:.0f}"),
            ("memory at peak under load, MiB", "peak", "{:.0f}"),
            ("non-2xx answers", "non2xx", "{:.0f}"))
    for label, field, fmt in rows:
        a, b = results["image"][field], results["process"][field]
        table.add_row(label, fmt.format(a), fmt.format(b), f"{a / b:.2f}x" if b else "-")
    console.print(table)
    console.print("[dim]the image's memory is its cgroup's (podman stats: its processes and "
                  "their page cache); the process's is the proportional set size of "
                  "gunicorn's master and workers (shared pages counted once)[/dim]")
    emit("container", [
        figure("image requests/s at c=32", results["image"]["rps"], "req/s",
               baseline="charter serve as a process", baseline_value=results["process"]["rps"]),
        figure("image memory at rest", results["image"]["rest"], "MiB"),
        figure("image memory at peak under load", results["image"]["peak"], "MiB",
               baseline="charter serve as a process",
               baseline_value=results["process"]["peak"]),
    ], image_bytes=size, workers=args.workers, duration_s=args.duration)


def _wait(port: int, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("the container did not answer /healthz")


def _measure(tool: dict[str, Any], port: int, duration: float,
             memory: Callable[[], float]) -> dict[str, float]:
    time.sleep(2)  # settled: workers booted, first connections made
    rest = memory()
    with Peak(memory) as peak:
        load = gw._throughput(tool, port, "/tgi/bench/generate", 32, duration)
    return {"rps": load["rps"], "rest": rest, "peak": peak.peak,
            "non2xx": load["non2xx"] + load["socket_errors"]}


if __name__ == "__main__":
    main()
