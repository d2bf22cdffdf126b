"""What limits cost on the gateway (`bench/gateway.py --limits`): one `charter serve` in
front of the TGI stub, with limits (Redis), metrics (multiprocess) and tracing off, the
way a production install runs; two API keys of two teams, alternated round by round on
the same workers: one under every limit kind (never reached: requests and tokens per
minute, tokens per day and month, the key's own requests per minute), one under none.
Side by side per key: throughput at c=32, CPU per request of Charter's processes and of
Redis, and c=1 latency. Goal: limits add at most 0.15 ms of CPU per request.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import gateway as gw
from results import emit, figure

GOAL_ADDED_CPU_MS = 0.15


def _limited_key() -> str:
    """A second team and key under every limit kind, set far above what the run reaches."""
    from charter.actor import SYSTEM
    from charter.identity.service import create_api_key, set_api_key_limits
    from charter.identity.teams import create_service_account, create_team, update_team

    big = 10**12
    team = create_team(SYSTEM, name="limited", description="", requests_per_day=10**9,
                       entitlements={"models": ["*"], "data_classes": ["*"], "regions": ["*"]},
                       default_data_class="internal")
    update_team(SYSTEM, team.id, {"limits": {
        "requests_per_minute": 10**9, "tokens_per_minute": big, "tokens_per_day": big,
        "tokens_per_month": big, "concurrent_streams": 10_000}},
        row_version=team.row_version)
    bot = create_service_account(SYSTEM, team.id, username="limited-bot")
    key = create_api_key(SYSTEM, bot.id, name="bench-limited").token
    set_api_key_limits(SYSTEM, key.split("_")[1], {"requests_per_minute": 10**9})
    return key


def _redis_pid(url: str) -> int:
    import redis

    return int(redis.Redis.from_url(url).info("server")["process_id"])


def run_limits(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from charter.settings import Settings

    console = Console(width=max(Console().width, 120))
    load_before = os.getloadavg()
    name = f"charter_bench_limits_{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    upstream = server = None
    created = False
    try:
        upstream = subprocess.Popen(
            [sys.executable, str(gw.HERE), "--role", "upstream", "--spec",
             json.dumps({"delay_ms": args.token_delay_ms})], stdout=subprocess.PIPE, text=True)
        assert upstream.stdout is not None
        up_port = json.loads(upstream.stdout.readline())["port"]
        url = gw._create_database(name)
        created = True
        settings = Settings.from_env({}, database_url=url, secret_key=gw.SECRET,
                                     node_allowed_networks="127.0.0.0/8", log_level="WARNING",
                                     limits_redis_url=args.redis)
        keys = {"no limits": gw._seed(settings, f"http://127.0.0.1:{up_port}"),
                "limits": _limited_key()}
        port = gw._free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
        env.update(CHARTER_DATABASE_URL=url, CHARTER_SECRET_KEY=gw.SECRET,
                   CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="WARNING",
                   CHARTER_LIMITS_REDIS_URL=args.redis)
        server = subprocess.Popen(
            [str(gw.BIN / "charter"), "serve", "--bind", f"127.0.0.1:{port}", "--workers",
             str(args.workers), "--threads", str(args.threads)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gw._wait_http(port, "/healthz", server)
        master, redis_pid = server.pid, _redis_pid(args.redis)
        groups = {"charter": lambda: [master, *gw._children(master)],
                  "redis": lambda: [redis_pid], "postgres": lambda: gw._pg_backends(name)}
        wrk = shutil.which("wrk")
        path = "/tgi/bench/generate"
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
        lat: dict[str, list[float]] = {k: [] for k in keys}
        for r in range(args.rounds):
            order = list(keys) if r % 2 == 0 else list(reversed(keys))
            for which in order:
                lua = tmp / f"{r}-{which.replace(' ', '_')}.lua"
                lua.write_text(gw.WRK_LUA.format(body=gw.BODY.decode(), key=keys[which]))
                tool = {"wrk": wrk, "lua": str(lua), "key": keys[which]}
                with gw.CpuMeter(groups) as meter:
                    got = gw._throughput(tool, port, path, 32, args.duration)
                got["cpu"], got["seconds"] = dict(meter.used), meter.seconds
                runs[which].append(got)
            one = gw._child("latency", {
                "targets": [{"name": k, "port": port, "path": path, "key": v}
                            for k, v in keys.items()],
                "key": keys["no limits"], "n": args.requests, "warmup": 50, "block": 50,
                "budget_s": 15}, timeout=120)
            for k in keys:
                lat[k].extend(one["ms"][k])
            console.print(f"[dim]round {r + 1}: " + "; ".join(
                f"{k} {runs[k][-1]['rps']:,.0f} req/s, "
                f"{1000 * runs[k][-1]['cpu']['charter'] / runs[k][-1]['requests']:.3f} ms CPU"
                for k in keys) + "[/dim]")

        def per_req(which: str, group: str) -> float:
            return statistics.median(1000 * x["cpu"][group] / x["requests"]
                                     for x in runs[which])

        table = Table(title=f"limits on and off, same workers ({args.workers} x "
                      f"{args.threads} threads), metrics on, tracing off; "
                      f"{args.rounds} rounds of {args.duration:g} s at c=32")
        for col in ("", "no limits", "limits (Redis)", "added"):
            table.add_column(col, justify="right")
        rows = [("req/s at c=32", lambda k: statistics.median(x["rps"] for x in runs[k]),
                 "{:,.0f}"),
                ("Charter CPU ms/request", lambda k: per_req(k, "charter"), "{:.3f}"),
                ("Redis CPU ms/request", lambda k: per_req(k, "redis"), "{:.3f}"),
                ("PostgreSQL CPU ms/request", lambda k: per_req(k, "postgres"), "{:.3f}"),
                ("c=1 p50 ms", lambda k: statistics.median(lat[k]), "{:.3f}"),
                ("c=1 p99 ms", lambda k: gw._pct(sorted(lat[k]), .99), "{:.3f}")]
        for label, f, fmt in rows:
            off, on = f("no limits"), f("limits")
            table.add_row(label, fmt.format(off), fmt.format(on), f"{on - off:+.3f}")
        errors = sum(x["non2xx"] + x["socket_errors"] for v in runs.values() for x in v)
        console.print(table)
        added = per_req("limits", "charter") - per_req("no limits", "charter")
        with_redis = added + per_req("limits", "redis") - per_req("no limits", "redis")
        met = added <= GOAL_ADDED_CPU_MS
        console.print(
            f"limits add {added:+.3f} ms of Charter's CPU per request (goal <= "
            f"{GOAL_ADDED_CPU_MS} ms: {'met' if met else 'NOT met'}), {with_redis:+.3f} ms "
            f"with Redis's; {errors} errors; load before "
            f"{', '.join(f'{x:.2f}' for x in load_before)}; {gw._machine()}")
        emit("limits", [figure("CPU per request added by limits", added, "ms",
                               baseline="no limits",
                               baseline_value=per_req("no limits", "charter"),
                               goal=f"<= {GOAL_ADDED_CPU_MS} ms", met=met)],
             errors=errors, workers=args.workers)
        if errors:
            raise SystemExit(f"{errors} requests failed")
    finally:
        gw._stop(server)
        gw._stop(upstream)
        if created:
            gw._drop_database(name)
        shutil.rmtree(tmp, ignore_errors=True)
