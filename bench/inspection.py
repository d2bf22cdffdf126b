"""What content inspection costs on the gateway (`bench/gateway.py --inspection`): one
`charter serve` in front of the TGI stub, two API keys of two teams on the same workers,
alternated round by round: policy data inspects one team's requests (the bundled
recognizers, its internal data's tables: nothing in these prompts is refused or
replaced) and not the other's. Prompts of 1 KB and 16 KB of plain prose with numbers,
dates and amounts in it (what a pattern recognizer has to look at, without a finding).
Side by side per size: CPU per request of Charter's processes at c=32, and c=1 latency.
Goal: at most 1 ms of CPU added per KB inspected (the median of the rounds). A request the
policy does not ask to inspect costs one look-up of its team, model and data class in
the inspection scope: timed on its own here (microseconds), it is the whole difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import gateway as gw
from results import emit, figure

GOAL_MS_PER_KB = 1.0
SIZES_KB = (1, 16)
WORDS = ("the committee reviewed quarterly figures for region north and agreed to extend "
         "the pilot until march while the budget of 42 000 euros stays within plan a "
         "second meeting on 14 april will look at staffing levels shipping volumes rose by "
         "3.5 percent year on year and the warehouse in building 7 now opens at 06:30 "
         "customers asked for clearer invoices order 88213 was delayed by two days").split()


def prose(kb: int, seed: int = 7) -> str:
    """`kb` KiB of sentences drawn from WORDS (deterministic), with no personal data."""
    rng, out, size = random.Random(seed), [], 0
    while size < kb * 1024:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 18)))
        sentence = sentence[0].upper() + sentence[1:] + ". "
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:kb * 1024]


def _body(kb: int) -> str:
    return json.dumps({"inputs": prose(kb), "parameters": {"max_new_tokens": 8}})


def _inspected_key() -> str:
    """A second team, whose requests policy data inspects, and its key."""
    from charter.actor import SYSTEM
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team

    team = create_team(SYSTEM, name="inspected", description="", requests_per_day=10**9,
                       entitlements={"models": ["*"], "data_classes": ["*"], "regions": ["*"]},
                       default_data_class="internal")
    bot = create_service_account(SYSTEM, team.id, username="inspected-bot")
    return create_api_key(SYSTEM, bot.id, name="bench-inspected").token


def _policies(tmp: Path) -> Path:
    from charter.policy.bundle import default_policy_dir

    target = tmp / "policies"
    shutil.copytree(default_policy_dir(), target)
    path = target / "data" / "inspection.json"
    data = json.loads(path.read_text())
    data["inspect"]["teams"] = ["inspected"]
    path.write_text(json.dumps(data))
    return target


def _scope_lookup_us(n: int = 200_000) -> float:
    """What deciding not to inspect costs: the scope's look-up, per request."""
    import time

    from charter.policy.service import InspectionScope

    scope = InspectionScope(teams=frozenset({"inspected"}))
    started = time.perf_counter()
    for _ in range(n):
        scope.applies("bench", ("bench", "bench/fast-tgi"), "internal")
    return (time.perf_counter() - started) / n * 1e6


def run_inspection(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from charter.settings import Settings

    console = Console(width=max(Console().width, 120))
    load_before = os.getloadavg()
    name = f"charter_bench_inspect_{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-inspection-"))
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
        policies = _policies(tmp)
        settings = Settings.from_env({}, database_url=url, secret_key=gw.SECRET,
                                     node_allowed_networks="127.0.0.0/8", log_level="WARNING",
                                     policy_dir=str(policies))
        keys = {"off": gw._seed(settings, f"http://127.0.0.1:{up_port}"),
                "on": _inspected_key()}
        port = gw._free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
        env.update(CHARTER_DATABASE_URL=url, CHARTER_SECRET_KEY=gw.SECRET,
                   CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="WARNING",
                   CHARTER_POLICY_DIR=str(policies))
        server = subprocess.Popen(
            [str(gw.BIN / "charter"), "serve", "--bind", f"127.0.0.1:{port}", "--workers",
             str(args.workers), "--threads", str(args.threads)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gw._wait_http(port, "/healthz", server)
        master = server.pid
        groups = {"charter": lambda: [master, *gw._children(master)],
                  "postgres": lambda: gw._pg_backends(name)}
        wrk = shutil.which("wrk")
        path = "/tgi/bench/generate"
        cases = [(kb, which) for kb in SIZES_KB for which in keys]
        runs: dict[tuple[int, str], list[dict[str, Any]]] = {c: [] for c in cases}
        lat: dict[tuple[int, str], list[float]] = {c: [] for c in cases}

        def lua_for(kb: int, which: str) -> dict[str, Any]:
            lua = tmp / f"{kb}-{which}.lua"
            lua.write_text(gw.WRK_LUA.format(body=_body(kb), key=keys[which]))
            return {"wrk": wrk, "lua": str(lua), "key": keys[which], "body": _body(kb)}

        for kb, which in cases:  # warm every worker's path (the loads happened at start)
            gw._throughput(lua_for(kb, which), port, path, 32, 1.0)
        for r in range(args.rounds):
            order = cases if r % 2 == 0 else list(reversed(cases))
            for kb, which in order:
                with gw.CpuMeter(groups) as meter:
                    got = gw._throughput(lua_for(kb, which), port, path, 32, args.duration)
                got["cpu"], got["seconds"] = dict(meter.used), meter.seconds
                runs[(kb, which)].append(got)
            one = gw._child("latency", {
                "targets": [{"name": f"{kb}-{which}", "port": port, "path": path,
                             "key": keys[which], "body": _body(kb)} for kb, which in cases],
                "key": keys["off"], "n": args.requests, "warmup": 20, "block": 20,
                "budget_s": 20}, timeout=180)
            for kb, which in cases:
                lat[(kb, which)].extend(one["ms"][f"{kb}-{which}"])
            last = {c: runs[c][-1] for c in cases}
            console.print(f"[dim]round {r + 1}: " + "; ".join(
                f"{kb} KB {which} {last[(kb, which)]['rps']:,.0f} req/s "
                f"{1000 * last[(kb, which)]['cpu']['charter'] / last[(kb, which)]['requests']:.3f}"
                " ms CPU" for kb, which in cases) + "[/dim]")

        def cpu_ms(case: tuple[int, str]) -> float:
            return statistics.median(1000 * x["cpu"]["charter"] / x["requests"]
                                     for x in runs[case])

        table = Table(title=f"inspection on and off, same workers ({args.workers} x "
                      f"{args.threads} threads); {args.rounds} rounds of {args.duration:g} s "
                      f"at c=32, {args.requests} c=1 requests a case and round")
        for col in ("", "not inspected", "inspected", "added", "added per KB"):
            table.add_column(col, justify="right")
        figures, per_kb = [], {}
        for kb in SIZES_KB:
            off, on = (kb, "off"), (kb, "on")
            added = cpu_ms(on) - cpu_ms(off)
            per_kb[kb] = added / kb
            rows = [(f"{kb} KB: Charter CPU ms/request", cpu_ms, "{:.3f}"),
                    (f"{kb} KB: req/s at c=32",
                     lambda c: statistics.median(x["rps"] for x in runs[c]), "{:,.0f}"),
                    (f"{kb} KB: c=1 p50 ms", lambda c: statistics.median(lat[c]), "{:.3f}"),
                    (f"{kb} KB: c=1 p99 ms", lambda c: gw._pct(sorted(lat[c]), .99), "{:.3f}")]
            for label, f, fmt in rows:
                a, b = f(off), f(on)
                table.add_row(label, fmt.format(a), fmt.format(b), f"{b - a:+.3f}",
                              f"{(b - a) / kb:+.3f}" if "CPU" in label or "p50" in label
                              else "")
            figures.append(figure(f"CPU per request added by inspecting {kb} KB", added,
                                  "ms", baseline="not inspected", baseline_value=cpu_ms(off),
                                  goal=f"<= {GOAL_MS_PER_KB * kb:g} ms",
                                  met=per_kb[kb] <= GOAL_MS_PER_KB))
        errors = sum(x["non2xx"] + x["socket_errors"] for v in runs.values() for x in v)
        console.print(table)
        lookup_us = _scope_lookup_us()
        console.print(f"a request not inspected: its scope look-up takes {lookup_us:.2f} µs "
                      "(nothing else of inspection runs)")
        met = all(v <= GOAL_MS_PER_KB for v in per_kb.values())
        console.print(
            "inspection adds " + ", ".join(f"{v:.3f} ms of CPU per KB at {kb} KB"
                                           for kb, v in per_kb.items())
            + f" (goal <= {GOAL_MS_PER_KB} ms per KB: {'met' if met else 'NOT met'}); "
            f"{errors} errors; load before {', '.join(f'{x:.2f}' for x in load_before)}; "
            f"{gw._machine()}")
        emit("inspection", figures, errors=errors, workers=args.workers)
        if errors:
            raise SystemExit(f"{errors} requests failed")
    finally:
        gw._stop(server)
        gw._stop(upstream)
        if created:
            gw._drop_database(name)
        shutil.rmtree(tmp, ignore_errors=True)
