"""Benchmark: a fast request's latency while slow ones hold worker threads, side by side for
charter serve's worker (charter.serving.KeepAliveThreadWorker) and gunicorn's gthread.

The timing that tests/integration/test_serving.py used to assert (a fast answer within
0.25 s while a slow request is in flight) is measured here instead, on the same tiny WSGI
app: `slow` requests are held in the app until released; `fast` ones answer at once.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from results import emit, figure
from rich.console import Console
from rich.table import Table

APP = '''
import os, time

def app(environ, start_response):
    body = environ["wsgi.input"].read()
    if environ["PATH_INFO"] == "/slow":  # held until the file `release` exists
        while not os.path.exists("release"):
            time.sleep(0.005)
    out = b"ok"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [out]
'''
WORKERS = {"charter serve (KeepAliveThreadWorker)": "charter.serving.KeepAliveThreadWorker",
           "gunicorn gthread": "gthread"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(conn: http.client.HTTPConnection, path: str) -> None:
    conn.request("POST", path, b"x")
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{path}: HTTP {resp.status}")


def measure(worker: str, *, threads: int, held: int, requests: int) -> list[float]:
    """Milliseconds per fast request on a kept-alive connection while `held` slow
    requests (on connections of their own) hold threads of the one worker."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "wsgiapp.py").write_text(APP)
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--chdir", tmp, "-b", f"127.0.0.1:{port}",
             "-w", "1", "--threads", str(threads), "-k", worker, "--keep-alive", "5",
             "wsgiapp:app"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            slow = [threading.Thread(target=_request, args=(
                http.client.HTTPConnection("127.0.0.1", port, timeout=60), "/slow"))
                for _ in range(held)]
            for t in slow:
                t.start()
            time.sleep(0.2)  # the slow ones are inside the app now
            fast = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            _request(fast, "/")  # connected and warm
            took = []
            for _ in range(requests):
                started = time.perf_counter()
                _request(fast, "/")
                took.append((time.perf_counter() - started) * 1000)
            (folder / "release").touch()
            for t in slow:
                t.join(timeout=30)
            return took
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--held", type=int, default=3, help="slow requests holding threads")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    console = Console()
    results: dict[str, list[float]] = {name: [] for name in WORKERS}
    for _ in range(args.rounds):  # alternate, so that load changes hit both alike
        for name, worker in WORKERS.items():
            results[name] += measure(worker, threads=args.threads, held=args.held,
                                     requests=args.requests)
    table = Table(title=f"fast requests while {args.held} of {args.threads} threads are held")
    for col in ("worker", "p50 ms", "p99 ms", "max ms", "p50 ratio"):
        table.add_column(col, justify="right")
    base = statistics.median(results["gunicorn gthread"])
    figures = []
    for name, took in results.items():
        took.sort()
        p50, p99 = statistics.median(took), took[int(len(took) * 0.99) - 1]
        table.add_row(name, f"{p50:.3f}", f"{p99:.3f}", f"{took[-1]:.3f}", f"{p50 / base:.2f}")
        figures.append(figure(f"{name}: fast request p50 with slow ones held", p50, "ms",
                              baseline="gunicorn gthread", baseline_value=base))
    console.print(table)
    console.print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    emit("serving", figures, threads=args.threads, held=args.held)


if __name__ == "__main__":
    main()
