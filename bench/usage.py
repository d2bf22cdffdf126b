"""Benchmark: do the usage counters match what the node counted, exactly, over a mixed run?

`charter serve` (2 workers) in front of bench/gateway.py's TGI stub, with the bench team
under every limit kind (never reached; their state in Redis) and tracing off; --requests
requests from 8 clients, mixed evenly: OpenAI chat completions, TGI `/generate`, OpenAI
chat streams (usage not asked for by the caller) and TGI `/generate_stream`, streams of 4
to 12 tokens. The stub's own counts are known: OpenAI prompts are 5 tokens and TGI's 4
(its count headers and its stream's `details`), a whole answer 8 tokens out, a stream as
many as were asked for. Nothing may be marked estimated. Afterwards, side by side:
requests and tokens as the stub counted them, as the `dispatch.outcome` events recorded
them, and as the usage counters (GET /api/v1/usage, what chargeback prices) hold them.
Every column must be equal.

    python bench/usage.py --requests 1000 --redis redis://127.0.0.1:6379/15
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import httpx
from results import emit, figure
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    import gateway as gw

    from charter.audit.service import EventFilter, list_events
    from charter.identity.service import set_api_key_limits
    from charter.identity.teams import list_teams, update_team

    console = Console()
    name = f"charter_bench_usage_{os.getpid()}"
    server = None
    with contextlib.ExitStack() as stack:
        world = stack.enter_context(gw.seeded(name, delay_ms=1, limits_redis_url=args.redis))
        stack.callback(lambda: gw._stop(server))
        url, key, settings = world.url, world.key, world.settings
        from charter.actor import SYSTEM

        big = 10**12
        [team] = [t for t in list_teams(SYSTEM) if t.name == "bench"]
        update_team(SYSTEM, team.id, {"limits": {
            "requests_per_minute": 10**9, "tokens_per_minute": big, "tokens_per_day": big,
            "tokens_per_month": big, "concurrent_streams": 10_000}},
            row_version=team.row_version)
        set_api_key_limits(SYSTEM, key.split("_")[1], {"requests_per_minute": 10**9})
        port = gw._free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
        env.update(CHARTER_DATABASE_URL=url, CHARTER_SECRET_KEY=gw.SECRET,
                   CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="WARNING",
                   CHARTER_LIMITS_REDIS_URL=args.redis)
        log = open(Path(tempfile.gettempdir()) / f"{name}.log", "wb")  # noqa: SIM115
        server = subprocess.Popen([str(Path(sys.executable).parent / "charter"), "serve",
                                   "--bind", f"127.0.0.1:{port}", "--workers", "2",
                                   "--threads", "32"], env=env, stdout=log, stderr=log)
        gw._wait_http(port, "/healthz", server)
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}
        rnd = random.Random(7)
        plan = [("chat", 0), ("generate", 0)] * (args.requests // 4)
        plan += [(rnd.choice(("stream", "chat_stream")), rnd.randint(4, 12))
                 for _ in range(args.requests - len(plan))]
        rnd.shuffle(plan)
        expected = {"requests": len(plan), "tokens_in": 0, "tokens_out": 0}
        for kind, n in plan:  # what the stub reports: OpenAI prompts 5, TGI's PROMPT_TOKENS
            expected["tokens_in"] += 5 if kind.startswith("chat") else gw.PROMPT_TOKENS
            expected["tokens_out"] += n if kind.endswith("stream") else 8

        def one(job: tuple[str, int]) -> int:
            kind, n = job
            with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
                if kind == "chat":
                    r = c.post("/v1/chat/completions", json={
                        "model": "bench", "max_tokens": 8,
                        "messages": [{"role": "user", "content": "hi"}]})
                    return r.status_code
                if kind == "generate":
                    return c.post("/tgi/bench/generate", json={
                        "inputs": "hi", "parameters": {"max_new_tokens": 8}}).status_code
                if kind == "chat_stream":  # usage not asked for: Charter asks for it
                    with c.stream("POST", "/v1/chat/completions", json={
                            "model": "bench", "max_tokens": n, "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as s:
                        body = b"".join(s.iter_bytes())
                    assert b'"usage"' not in body and body.endswith(b"data: [DONE]\n\n"), body
                    return s.status_code
                with c.stream("POST", "/tgi/bench/generate_stream", json={
                        "inputs": "hi", "parameters": {"max_new_tokens": n}}) as s:
                    for _ in s.iter_bytes():
                        pass
                    return s.status_code

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, plan))
        took = time.perf_counter() - t0
        assert codes.count(200) == len(plan), {c: codes.count(c) for c in set(codes)}
        gw._stop(server)  # its workers write the outcomes they still hold on the way out
        server = None
        gw._bind_runtime(settings)
        outcomes = list_events(EventFilter(action="dispatch.outcome", limit=len(plan) + 10))
        recorded = {"requests": len(outcomes),
                    "tokens_in": sum(o.details["tokens_in"] for o in outcomes),
                    "tokens_out": sum(o.details["tokens_out"] for o in outcomes)}
        estimated = sum(1 for o in outcomes if o.details.get("tokens_estimated"))
        from charter.metering.service import usage_since

        rows = usage_since([team.id], date(2000, 1, 1))
        counted = {"requests": sum(r.requests for r in rows),
                   "tokens_in": sum(r.tokens_in for r in rows),
                   "tokens_out": sum(r.tokens_out for r in rows)}
        table = Table(title=f"{len(plan)} requests ({plan.count(('chat', 0))} chat, "
                      f"{plan.count(('generate', 0))} generate, "
                      f"{sum(1 for k, _ in plan if k == 'chat_stream')} chat streams, "
                      f"{sum(1 for k, _ in plan if k == 'stream')} TGI streams) in {took:.1f} s")
        for col in ("", "the node counted", "dispatch.outcome events", "usage counters",
                    "match"):
            table.add_column(col, justify="right")
        ok = estimated == 0
        for k in ("requests", "tokens_in", "tokens_out"):
            same = expected[k] == recorded[k] == counted[k]
            ok = ok and same
            table.add_row(k, f"{expected[k]:,}", f"{recorded[k]:,}", f"{counted[k]:,}",
                          "[green]exact[/]" if same else "[red]NO[/]")
        console.print(table)
        console.print(f"outcomes marked estimated: {estimated}; limits on (Redis "
                      f"{args.redis}), tracing off, 2 workers; load "
                      f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        emit("usage", [figure("usage counters equal to the node's counts", 1.0 if ok else 0.0,
                              "", goal="exact", met=ok)],
             requests=len(plan), tokens_out=expected["tokens_out"])
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
