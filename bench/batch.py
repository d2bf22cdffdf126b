"""Benchmark: lines/s through Charter's batch path vs the same lines sent directly to the
same node with the same concurrency, side by side, several rounds, medians.

The node is an asyncio stub that answers OpenAI chat completions after `--node-ms` (a GPU
node's generation time: it waits, it does not burn the host's CPU). Charter's path is the
real one: `POST /v1/files` and `/v1/batches` on `charter serve`, Celery on Redis, one
`charter worker` with `--concurrency` threads, and the node's batch slots set to the same
number, so both paths keep exactly that many requests on the node. Every line is decided by
the dispatch policy, its decision committed before it is sent, its answer and outcome
written in one transaction. Goal: >= 0.8 x direct.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway as gw  # noqa: E402 - the gateway benchmark's database, seed and helpers
from results import emit, figure  # noqa: E402

GOAL_RATIO = 0.8


# --- the node: OpenAI chat after a fixed delay ----------------------------------------------

class SlowNode(asyncio.Protocol):
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].split(b"\r\n")
        length = 0
        for line in head[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if len(self.buf) < end + 4 + length:
            return
        self.buf = self.buf[end + 4 + length:]
        method, target = head[0].split(b" ")[:2]
        answer = gw.CANNED.get((method, target), gw.NOT_FOUND)
        if method == b"POST":
            asyncio.get_running_loop().call_later(self.delay_s, self._reply, answer)
        else:
            self._reply(answer)

    def _reply(self, answer: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)
            if self.buf:
                self.data_received(b"")


async def _serve_node(delay_s: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SlowNode(delay_s), "127.0.0.1", 0, backlog=2048)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    await server.serve_forever()


# --- the two paths --------------------------------------------------------------------------

def _lines(n: int, model: str) -> list[dict[str, Any]]:
    return [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": 8,
                      "messages": [{"role": "user", "content": f"document {i}"}]}}
            for i in range(n)]


def direct(port: int, n: int, concurrency: int) -> float:
    """Seconds to send n lines straight to the node with `concurrency` keep-alive clients."""
    bodies = [json.dumps({**line["body"], "model": gw.MODEL_ID}).encode()
              for line in _lines(n, gw.MODEL_ID)]
    todo = iter(bodies)
    lock = threading.Lock()
    errors: list[int] = []

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                body = next(todo, None)
            if body is None:
                return
            conn.request("POST", "/v1/chat/completions", body,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(resp.status)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"direct: {len(errors)} errors")
    return elapsed


def _call(port: int, key: str, method: str, path: str, body: bytes | None = None,
          ctype: str = "application/json") -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body, {"Authorization": f"Bearer {key}", "Content-Type": ctype})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise SystemExit(f"{method} {path}: {resp.status} {data[:300]!r}")
    return json.loads(data)  # type: ignore[no-any-return]


def through_charter(port: int, key: str, n: int) -> tuple[float, dict[str, Any]]:
    """Seconds from creating the batch to its completion (the upload is not counted)."""
    content = ("\n".join(json.dumps(x) for x in _lines(n, "bench")) + "\n").encode()
    boundary = uuid.uuid4().hex
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            f"batch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n").encode() + \
        content + f"\r\n--{boundary}--\r\n".encode()
    uploaded = _call(port, key, "POST", "/v1/files", form,
                     f"multipart/form-data; boundary={boundary}")
    started = time.perf_counter()
    batch = _call(port, key, "POST", "/v1/batches", json.dumps({
        "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).encode())
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.05)
        batch = _call(port, key, "GET", f"/v1/batches/{batch['id']}")
    elapsed = time.perf_counter() - started
    if batch["status"] != "completed" or batch["request_counts"]["completed"] != n:
        raise SystemExit(f"the batch ended {batch['status']}: {batch['request_counts']}")
    return elapsed, batch


# --- the run --------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from charter.settings import Settings

    console = Console()
    dbname = f"charter_bench_batch_{os.getpid()}"
    node = subprocess.Popen([sys.executable, __file__, "--node", str(args.node_ms)],
                            stdout=subprocess.PIPE, text=True)
    procs: list[subprocess.Popen[Any]] = [node]
    try:
        assert node.stdout is not None
        node_port = json.loads(node.stdout.readline())["port"]
        url = gw._create_database(dbname)
        settings = Settings.from_env({}, database_url=url, secret_key=gw.SECRET,
                                     node_allowed_networks="127.0.0.0/8")
        key = gw._seed(settings, f"http://127.0.0.1:{node_port}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
        # The stub node has capacity 512: its batch slots equal the concurrency.
        env.update(CHARTER_DATABASE_URL=url, CHARTER_SECRET_KEY=gw.SECRET,
                   CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="WARNING",
                   CHARTER_TASK_BACKEND="celery", CHARTER_BROKER_URL=args.broker,
                   CHARTER_TASK_QUEUE=f"charter-bench-{uuid.uuid4().hex[:8]}",
                   CHARTER_BATCH_NODE_SHARE=str(args.concurrency / 512),
                   CHARTER_BATCH_LANES=str(args.concurrency * args.lanes_per_slot),
                   CHARTER_NODE_PROBE_INTERVAL_S="3600")
        api_port = gw._free_port()
        serve = subprocess.Popen([str(gw.BIN / "charter"), "serve", "--bind",
                                  f"127.0.0.1:{api_port}", "--workers", "1"], env=env)
        procs.append(serve)
        gw._wait_http(api_port, "/healthz", serve)
        workers = [subprocess.Popen([str(gw.BIN / "charter"), "worker", "--concurrency",
                                     str(args.concurrency * args.lanes_per_slot // args.workers),
                                     "--loglevel",
                                     "WARNING"], env=env) for _ in range(args.workers)]
        procs.extend(workers)
        worker = workers[0]
        through_charter(api_port, key, 20)  # warm-up: the worker is up and connected
        rounds = []
        for r in range(args.rounds):
            d = direct(node_port, args.lines, args.concurrency)
            worker_cpu = sum(gw._cpu_s(w.pid) for w in workers)
            pg_cpu = sum(gw._cpu_s(p) for p in gw._pg_backends(dbname))
            spy = None
            if args.py_spy and r == args.rounds - 1:
                spy = subprocess.Popen([args.py_spy, "record", "--idle", "-r", "100", "-d",
                                        "6", "-f", "raw", "-o", str(SPY_OUT), "-p",
                                        str(worker.pid)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            c, _ = through_charter(api_port, key, args.lines)
            if spy is not None:
                spy.wait(timeout=30)
            worker_cpu = sum(gw._cpu_s(w.pid) for w in workers) - worker_cpu
            pg_cpu = sum(gw._cpu_s(p) for p in gw._pg_backends(dbname)) - pg_cpu
            rounds.append({"direct": args.lines / d, "charter": args.lines / c,
                           "ratio": d / c, "worker_ms": worker_cpu * 1000 / args.lines,
                           "pg_ms": pg_cpu * 1000 / args.lines})
            console.print(f"round {r + 1}: direct {args.lines / d:,.0f} lines/s, "
                          f"charter {args.lines / c:,.0f} lines/s, ratio {d / c:.2f}")
    finally:
        for proc in reversed(procs):
            gw._stop(proc)
        gw._drop_database(dbname)

    def med(name: str) -> float:
        return statistics.median(x[name] for x in rounds)

    table = Table(title=f"{args.lines} lines, {args.concurrency} at the node at once "
                        f"({args.concurrency * args.lanes_per_slot} lanes in {args.workers} "
                        f"workers), node "
                        f"{args.node_ms} ms a request, {args.rounds} rounds (medians); "
                        f"{gw._machine()}")
    for col in ("path", "lines/s", "ratio", "worker CPU ms/line", "PostgreSQL CPU ms/line"):
        table.add_column(col, justify="right" if col != "path" else "left")
    table.add_row("direct to the node", f"{med('direct'):,.0f}", "1.00", "-", "-")
    ratio = med("ratio")
    table.add_row("Charter batch (Celery on Redis)", f"{med('charter'):,.0f}", f"{ratio:.2f}",
                  f"{med('worker_ms'):.2f}", f"{med('pg_ms'):.2f}")
    console.print(table)
    if args.py_spy:
        _lane_profile(console)
    met = ratio >= GOAL_RATIO
    emit("batch", [figure("batch lines/s through Charter", med("charter"), "/s",
                          baseline="direct to the node", baseline_value=med("direct"),
                          goal=f">= {GOAL_RATIO}x direct", met=met)],
         lines=args.lines, concurrency=args.concurrency, node_ms=args.node_ms)
    by_round = ", ".join(f"{x['ratio']:.2f}" for x in rounds)
    console.print(f"goal >= {GOAL_RATIO} x direct: {'met' if met else 'NOT met'} "
                  f"(ratios by round: {by_round})")


SPY_OUT = Path(tempfile.gettempdir()) / "charter-bench-batch-worker.txt"


def _lane_profile(console: Any) -> None:
    """Where a lane's wall time goes (py-spy samples of the lane threads, idle included)."""
    from collections import Counter

    stages: Counter[str] = Counter()
    total = 0
    for line in SPY_OUT.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        if "run_lane" not in stack:
            continue
        total += int(n)
        frames = [f for f in stack.split(";") if "charter/" in f]
        stages[" <- ".join(f.split(" (")[0] for f in frames[-2:])] += int(n)
    console.print(f"lane wall time by stage ({total} samples):")
    for name, n in stages.most_common(15):
        console.print(f"  {n * 100 / max(total, 1):5.1f}%  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--node-ms", type=float, default=50.0,
                        help="the node's time per request (generation on its GPU)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lanes-per-slot", type=int, default=2,
                        help="lanes per node slot: the node still gets `--concurrency` at once; "
                        "the other lanes claim, decide and record meanwhile")
    parser.add_argument("--workers", type=int, default=2,
                        help="`charter worker` processes; the concurrency is split among them")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--py-spy", help="py-spy binary: profile the worker's lanes")
    parser.add_argument("--node", type=float, help=argparse.SUPPRESS)  # the node process
    args = parser.parse_args()
    if args.node is not None:
        asyncio.run(_serve_node(args.node / 1000))
        return
    run(args)


if __name__ == "__main__":
    main()
