"""Benchmark: this checkout's `charter serve` against another checkout's, interleaved.

On a shared 2-core machine one run of bench/gateway.py against another minutes later
compares two phases of the machine as much as two commits. Here both checkouts serve in
turn (`--reps` times each, alternating) on one database, one stub and one key: c=1
latency, c=32 throughput on the TGI route and on the chat route (wrk), then 200 concurrent
streams, each with the CPU its gunicorn processes used. Medians per side and their ratio.

    python bench/gateway_ab.py --baseline /path/to/a/worktree [--reps 3]

The baseline runs on its own `.venv` where it has one, else on this one's with its code
first on the path (a worktree of another commit with the same dependencies).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
import gateway as gw  # noqa: E402 - the stub, the database, the seeding and the load of bench/gateway.py


def _serve(checkout: Path, database_url: str, port: int) -> subprocess.Popen[Any]:
    own = checkout / ".venv" / "bin" / "charter"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
    if not own.exists():
        env["PYTHONPATH"] = str(checkout / "platform")
    env.update(CHARTER_DATABASE_URL=database_url, CHARTER_SECRET_KEY=gw.SECRET,
               CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="WARNING")
    charter = own if own.exists() else ROOT / ".venv" / "bin" / "charter"
    return subprocess.Popen([str(charter), "serve", "--bind", f"127.0.0.1:{port}",
                             "--workers", "3", "--threads", "256"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _one(checkout: Path, database_url: str, key: str, lua: dict[str, str],
         streams: int, duration: float, dbname: str) -> dict[str, float]:
    port = gw._free_port()
    proc = _serve(checkout, database_url, port)
    try:
        gw._wait_http(port, "/healthz", proc)
        groups = {"charter": lambda: [proc.pid, *gw._children(proc.pid)],
                  "postgres": lambda: gw._pg_backends(dbname)}
        target = {"name": "charter", "port": port, "path": "/tgi/bench/generate"}
        lat = gw._child("latency", {"targets": [target], "key": key, "n": 400,
                                    "warmup": 50, "block": 50, "budget_s": 15}, timeout=120)
        out = {"c1_p50_ms": statistics.median(lat["ms"]["charter"])}
        tool = {"wrk": shutil.which("wrk"), "key": key}
        for name, path in (("tgi", "/tgi/bench/generate"), ("chat", gw.CHAT_PATH)):
            with gw.CpuMeter(groups) as meter:
                got = gw._throughput({**tool, "lua": lua[name]}, port, path, 32, duration)
            out[f"{name}_rps"] = got["rps"]
            out[f"{name}_cpu_ms"] = meter.used["charter"] * 1000 / max(1, got["requests"])
            out[f"{name}_pg_ms"] = meter.used["postgres"] * 1000 / max(1, got["requests"])
            out[f"{name}_errors"] = got["non2xx"] + got["socket_errors"]
        spec = {"port": port, "path": "/tgi/bench/generate_stream", "key": key,
                "streams": streams, "tokens": 50, "timeout": 60}
        with gw.CpuMeter(groups) as meter:
            got = gw._child("streams", spec, timeout=120)
        out["stream_cpu_ms"] = meter.used["charter"] * 1000 / streams
        out["ttft_p50_ms"] = statistics.median(got["ttft"]) if got["ttft"] else float("nan")
        out["stream_errors"] = got["errors"]
        return out
    finally:
        gw._stop(proc)


ROWS = (("c1_p50_ms", "c=1 p50 ms (TGI route)"), ("tgi_rps", "c=32 req/s, TGI route"),
        ("tgi_cpu_ms", "c=32 Charter CPU ms/req, TGI route"),
        ("tgi_pg_ms", "c=32 PostgreSQL CPU ms/req, TGI route"),
        ("chat_rps", "c=32 req/s, chat route"),
        ("chat_cpu_ms", "c=32 Charter CPU ms/req, chat route"),
        ("stream_cpu_ms", "streams at once: Charter CPU ms/stream"),
        ("ttft_p50_ms", "streams at once: TTFT p50 ms"),
        ("errors", "errors (all runs)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (scripts/bench-tools installs it)")
    console = Console(width=max(Console().width, 120))
    sides = {"this checkout": ROOT, "baseline": args.baseline.resolve()}
    load_before = os.getloadavg()
    dbname = f"charter_bench_ab_{os.getpid()}"
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    with gw.seeded(dbname, delay_ms=10) as world, \
            tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        lua = {}
        for name, body in (("tgi", gw.BODY.decode()), ("chat", gw._chat_body("bench"))):
            path = Path(tmp) / f"{name}.lua"
            path.write_text(gw.WRK_LUA.format(body=body, key=world.key))
            lua[name] = str(path)
        for rep in range(args.reps):
            order = list(sides.items()) if rep % 2 == 0 else list(sides.items())[::-1]
            for side, checkout in order:
                got = _one(checkout, world.url, world.key, lua, args.streams, args.duration,
                           dbname)
                runs[side].append(got)
                console.print(f"[dim]rep {rep} {side}: " + ", ".join(
                    f"{k} {v:.3g}" for k, v in got.items()) + "[/dim]")
    table = Table(title=f"charter serve, this checkout vs {args.baseline} (medians of "
                  f"{args.reps} interleaved runs each; 3 workers x 256 threads; {args.streams} "
                  "streams at once)")
    for col in ("figure", "this checkout", "baseline", "this / baseline"):
        table.add_column(col, justify="right")
    for key_, label in ROWS:
        if key_ == "errors":
            errs = {s: sum(r["tgi_errors"] + r["chat_errors"] + r["stream_errors"]
                           for r in runs[s]) for s in sides}
            table.add_row(label, str(errs["this checkout"]), str(errs["baseline"]), "")
            continue
        this = statistics.median(r[key_] for r in runs["this checkout"])
        base = statistics.median(r[key_] for r in runs["baseline"])
        table.add_row(label, f"{this:.3f}", f"{base:.3f}", f"{this / base:.2f}x")
    console.print(table)
    console.print(f"[dim]{gw._machine()}; load average before {load_before[0]:.2f}, after "
                  f"{os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}[/dim]")


if __name__ == "__main__":
    main()
