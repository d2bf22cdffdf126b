"""Charter past one process: 1, 2 and 3 `charter serve` instances (separate processes on
separate ports, as pods would be) against one PostgreSQL and one TGI stub, the load spread
over them; total throughput at c=32, and the audit writer's batches (entries a
transaction, from each instance's own `charter_audit_commit_entries`) as instances are
added. Every instance commits to the same chain under the same head lock.

On a machine of few cores the instances share them: throughput cannot grow with
instances here, and the figure to read is whether the shared head holds (batch sizes,
errors), not the scaling. bench/audit_head.py measures the head's own ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
from typing import Any

import gateway as gw
import httpx
from results import emit, figure
from rich.console import Console
from rich.table import Table


def _batch(port: int) -> tuple[float, float]:
    """(sum, count) of the instance's charter_audit_commit_entries histogram."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^charter_audit_commit_entries_(sum|count) ([0-9.e+]+)$", text, re.M)}
    return found.get("sum", 0.0), found.get("count", 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2, help="each instance's workers")
    ap.add_argument("--instances", default="1,2,3")
    args = ap.parse_args()
    from charter.settings import Settings

    console = Console(width=max(Console().width, 120))
    load_before = os.getloadavg()
    name = f"charter_bench_scale_{os.getpid()}"
    upstream = subprocess.Popen([sys.executable, str(gw.HERE), "--role", "upstream",
                                 "--spec", json.dumps({"delay_ms": 10.0})],
                                stdout=subprocess.PIPE, text=True)
    assert upstream.stdout is not None
    up_port = json.loads(upstream.stdout.readline())["port"]
    url = gw._create_database(name)
    rows = []
    try:
        settings = Settings.from_env({}, database_url=url, secret_key=gw.SECRET,
                                     node_allowed_networks="127.0.0.0/8", log_level="WARNING")
        key = gw._seed(settings, f"http://127.0.0.1:{up_port}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
        env.update(CHARTER_DATABASE_URL=url, CHARTER_SECRET_KEY=gw.SECRET,
                   CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="WARNING")
        for n in (int(x) for x in args.instances.split(",")):
            servers, ports = [], []
            try:
                for _ in range(n):
                    port = gw._free_port()
                    proc = subprocess.Popen(
                        [str(gw.BIN / "charter"), "serve", "--bind", f"127.0.0.1:{port}",
                         "--workers", str(args.workers), "--threads", "64"], env=env,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    servers.append(proc)
                    ports.append(port)
                for port, proc in zip(ports, servers, strict=True):
                    gw._wait_http(port, "/healthz", proc)
                results: list[dict[str, Any]] = []
                before = [_batch(p) for p in ports]

                def load(port: int, conc: int, results: list[dict[str, Any]] = results) -> None:
                    results.append(gw._child("load", {
                        "port": port, "path": "/tgi/bench/generate", "key": key,
                        "conc": conc, "duration": args.duration},
                        timeout=args.duration + 60))

                gw._child("load", {"port": ports[0], "path": "/tgi/bench/generate",
                                   "key": key, "conc": 8, "duration": 1.0}, timeout=60)
                threads = [threading.Thread(target=load, args=(p, max(1, 32 // n)))
                           for p in ports]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                after = [_batch(p) for p in ports]
                entries = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
                commits = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
                rows.append({"instances": n, "rps": sum(r["rps"] for r in results),
                             "errors": sum(r["non2xx"] + r["socket_errors"] for r in results),
                             "batch": entries / commits if commits else 0.0,
                             "tx_s": commits / args.duration})
                console.print(f"[dim]{n} instance(s): {rows[-1]['rps']:,.0f} req/s, "
                              f"batches of {rows[-1]['batch']:.1f}[/dim]")
            finally:
                for proc in servers:
                    gw._stop(proc)
    finally:
        gw._stop(upstream)
        gw._drop_database(name)
    table = Table(title=f"instances of charter serve ({args.workers} workers each) on one "
                  f"PostgreSQL, c=32 spread over them, {args.duration:g} s")
    for col in ("instances", "req/s (total)", "vs one", "audit transactions/s",
                "entries/transaction", "errors"):
        table.add_column(col, justify="right")
    one = rows[0]["rps"] if rows else 1.0
    for r in rows:
        table.add_row(str(r["instances"]), f"{r['rps']:,.0f}", f"{r['rps'] / one:.2f}x",
                      f"{r['tx_s']:,.0f}", f"{r['batch']:.1f}", str(r["errors"]))
    console.print(table)
    console.print(f"load before {', '.join(f'{x:.2f}' for x in load_before)}; {gw._machine()}")
    emit("scaleout", [figure(f"{r['instances']} instances", r["rps"], "req/s",
                             baseline="1 instance", baseline_value=one) for r in rows],
         rows=rows)
    if any(r["errors"] for r in rows):
        raise SystemExit("requests failed")


if __name__ == "__main__":
    main()
