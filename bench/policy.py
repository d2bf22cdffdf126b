"""Benchmark: policy decisions in-process (regorus) vs over OPA's Data API, side by side."""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from results import emit, figure
from rich.console import Console
from rich.table import Table

from charter.policy.bundle import POLICIES, PolicyBundle, default_policy_dir
from charter.policy.engine import InProcessEngine, PolicyEngine, RemoteEngine, parse_result

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.opa_server: test-only code, fine for a benchmark

CASES_DIR = REPO / "tests" / "policy_cases"
DENY_CASE = {"admission": "branch name is no pin", "dispatch": "revoked"}
P99_GOAL_MS = 1.0  # in-process dispatch decision p99
RATE_GOAL = 2_000  # in-process dispatch decisions/s per core
REMOTE_RATIO_GOAL = 3.0  # remote p50 / in-process p50

NOTE = (
    "The OPA server here is tests/opa_server.py: OPA's Go evaluator embedded in Python "
    "(opa_bindings) behind http.server's ThreadingHTTPServer, run in its own process so its "
    "CPU is not counted against the client's GIL. That is slower than a real "
    "`opa run --server` sidecar (Go net/http, no Python per request), so the remote numbers "
    "are a pessimistic bound."
)


def load_inputs() -> list[tuple[str, str, dict[str, Any], bool]]:
    """(policy, label, input, expected allow): each policy's base and one denying case."""
    from tests.policy_cases import apply_patch

    out = []
    for policy in POLICIES:
        spec = json.loads((CASES_DIR / f"{policy}.json").read_text())
        deny = next(c for c in spec["cases"] if c["name"] == DENY_CASE[policy])
        out.append((policy, "allow: base", spec["base"], True))
        out.append(
            (policy, f"deny: {deny['name']}", apply_patch(spec["base"], deny["patch"]), False)
        )
    return out


def _serve(ready: Any, stop: Any, nodelay: bool) -> None:
    from tests.opa_server import OpaTestServer

    with OpaTestServer() as server:
        # http.server writes the headers and the body in two send()s; with Nagle on, the
        # body waits for the client's delayed ACK (~40 ms on Linux). Go's net/http (a real
        # OPA) sets TCP_NODELAY, so by default this bench does too.
        server.httpd.RequestHandlerClass.disable_nagle_algorithm = nodelay
        ready.put(server.url)
        stop.wait()


def pct(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


def run_loop(engine: PolicyEngine, policy: str, doc: dict[str, Any], n: int) -> list[float]:
    lat = []
    clock = time.perf_counter
    for _ in range(n):
        t = clock()
        engine.evaluate(policy, doc)
        lat.append((clock() - t) * 1000)
    return lat


def measure(
    engine: PolicyEngine, policy: str, doc: dict[str, Any], n: int, warmup: int, threads: int = 1
) -> dict[str, float]:
    """n decisions per thread after a warm-up in each thread; aggregate decisions/s."""
    barrier = threading.Barrier(threads + 1)
    results: list[list[float]] = []
    cpu: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        run_loop(engine, policy, doc, warmup)  # also builds this thread's regorus Engine
        barrier.wait()
        started = time.thread_time()
        lat = run_loop(engine, policy, doc, n)
        used = time.thread_time() - started
        with lock:
            results.append(lat)
            cpu.append(used)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in pool:
        t.join()
    wall = time.perf_counter() - started
    lat = sorted(x for r in results for x in r)
    return {
        "n": len(lat),
        "rate": len(lat) / wall,
        "p50": pct(lat, 0.50),
        "p99": pct(lat, 0.99),
        "mean": sum(lat) / len(lat),
        "cpu": sum(cpu) * 1000 / len(lat),  # CPU ms per decision, client threads only
    }


def interleaved(stages: list[tuple[str, Callable[[], Any]]], n: int) -> list[tuple[str, float]]:
    """p50 ms of each stage, calling the stages round-robin so that all of them see the same
    machine (a shared box's speed drifts from minute to minute)."""
    for _ in range(max(1, n // 10)):
        for _, fn in stages:
            fn()
    lat: list[list[float]] = [[] for _ in stages]
    clock = time.perf_counter
    for _ in range(n):
        for i, (_, fn) in enumerate(stages):
            t = clock()
            fn()
            lat[i].append((clock() - t) * 1000)
    return [(name, pct(sorted(x), 0.5)) for (name, _), x in zip(stages, lat, strict=True)]


def breakdown(
    bundle: PolicyBundle,
    inproc: InProcessEngine,
    remote: RemoteEngine,
    policy: str,
    doc: dict[str, Any],
    n: int,
) -> list[tuple[str, float]]:
    """Where one decision's time goes, stage by stage, for each backend."""
    rule = f"data.{POLICIES[policy]}.decision"
    eng = inproc.engine()
    as_json = json.dumps(doc)
    eng.set_input_json(as_json)
    raw = eng.eval_rule_as_json(rule)
    value = json.loads(raw)
    floor_rule = f"data.{POLICIES[policy]}._v"  # `_v := input.version`: a rule doing nothing

    path = "/v1/data/" + POLICIES[policy].replace(".", "/") + "/decision"
    session = remote.client._session
    base = remote.url
    body = json.dumps({"input": doc}).encode()
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=2.0)

    def raw_post() -> bytes:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        return conn.getresponse().read()

    def raw_health() -> bytes:
        conn.request("GET", "/health")
        return conn.getresponse().read()

    from opa_bindings import OpaEngine

    opa = OpaEngine()
    for f in bundle.policies:
        opa.add_policy(f.path.removesuffix(".rego"), f.source)
    opa.add_data({**bundle.data["charter"], "revision": bundle.revision}, "charter")
    dotted = f"{POLICIES[policy]}.decision"
    stages: list[tuple[str, Callable[[], Any]]] = [
        ("in-process: InProcessEngine.evaluate (total)", lambda: inproc.evaluate(policy, doc)),
        ("  json.dumps(input)", lambda: json.dumps(doc)),
        ("  set_input_json", lambda: eng.set_input_json(as_json)),
        ("  eval_rule_as_json (the Rego evaluation)", lambda: eng.eval_rule_as_json(rule)),
        ("  json.loads(result)", lambda: json.loads(raw)),
        ("  parse_result", lambda: parse_result(value, 0.0)),
        ("  alt: set_input(dict), no JSON", lambda: eng.set_input(doc)),
        ("  alt: eval_rule (Python object back)", lambda: eng.eval_rule(rule)),
        ("  floor: eval_rule of `_v := input.version`", lambda: eng.eval_rule(floor_rule)),
    ]
    remote_stages: list[tuple[str, Callable[[], Any]]] = [
        ("remote: RemoteEngine.evaluate (total)", lambda: remote.evaluate(policy, doc)),
        (
            "  requests POST (opa_client's session)",
            lambda: session.post(base + path, json={"input": doc}, timeout=2.0).json(),
        ),
        ("  http.client POST, keep-alive", raw_post),
        ("  requests GET /health (no eval)", lambda: session.get(base + "/health").json()),
        ("  http.client GET /health (HTTP floor)", raw_health),
        ("  OPA eval_document, no HTTP (server-side eval)", lambda: opa.eval_document(dotted, doc)),
    ]
    try:  # two groups: mixed in with HTTP and OPA's Go runtime, regorus ran slower
        return interleaved(stages, n) + interleaved(remote_stages, n)
    finally:
        conn.close()
        opa.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--inprocess", type=int, default=5000, help="decisions per in-process run")
    ap.add_argument("--remote", type=int, default=2000, help="decisions per remote run")
    ap.add_argument("--warmup", type=int, default=200, help="warm-up decisions per run/thread")
    ap.add_argument("--threads", type=int, default=2, help="threads for the concurrent run")
    ap.add_argument(
        "--breakdown",
        type=int,
        default=2000,
        help="rounds of the interleaved time breakdown (0: skip it)",
    )
    ap.add_argument(
        "--nagle",
        action="store_true",
        help="leave Nagle on in the OPA test server, as tests/opa_server.py does",
    )
    args = ap.parse_args()
    console = Console(width=max(Console().width, 132))
    load_before = os.getloadavg()[0]

    bundle = PolicyBundle.load(default_policy_dir())
    inputs = load_inputs()
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(ready, stop, not args.nagle), daemon=True)
    server.start()
    try:
        url = ready.get(timeout=60)
        inproc = InProcessEngine(bundle)
        remote = RemoteEngine(bundle, url, timeout_s=2.0)
        for policy, label, doc, allow in inputs:  # both backends agree, as expected
            for engine in (inproc, remote):
                got = engine.evaluate(policy, doc).allow
                if got is not allow:
                    raise SystemExit(f"{engine.name} said allow={got} on {policy} {label}")

        rows = []
        for policy, label, doc, _ in inputs:
            one = measure(inproc, policy, doc, args.inprocess, args.warmup)
            many = measure(inproc, policy, doc, args.inprocess, args.warmup, args.threads)
            rem = measure(remote, policy, doc, args.remote, args.warmup)
            rows.append((policy, label, one, many, rem))
            console.print(f"[dim]measured {policy} {label}[/dim]")

        emit("policy", [
            f for policy, label, one, _, rem in rows for f in (
                figure(f"{policy} ({label}) in-process decisions/s", one["rate"], "/s"),
                figure(f"{policy} ({label}) remote OPA decisions/s", rem["rate"], "/s",
                       baseline="in-process", baseline_value=one["rate"]))])
        table = Table(title=f"Policy decisions, engine level (revision {bundle.revision[:19]})")
        for col in (
            "policy",
            "input",
            "backend",
            "threads",
            "decisions",
            "decisions/s",
            "p50 ms",
            "p99 ms",
            "mean ms",
            "client CPU ms",
        ):
            table.add_column(
                col, justify="left" if col in ("policy", "input", "backend") else "right"
            )
        for policy, label, one, many, rem in rows:
            for backend, threads, m in (
                ("in-process", 1, one),
                ("in-process", args.threads, many),
                ("remote OPA", 1, rem),
            ):
                table.add_row(
                    policy,
                    label,
                    backend,
                    str(threads),
                    f"{m['n']:,}",
                    f"{m['rate']:,.0f}",
                    f"{m['p50']:.3f}",
                    f"{m['p99']:.3f}",
                    f"{m['mean']:.3f}",
                    f"{m['cpu']:.3f}",
                )
            table.add_section()
        console.print(table)

        ratios = Table(title="Ratios")
        for col in (
            "policy",
            "input",
            "remote p50 / in-process p50",
            "in-process decisions/s per core",
            "per CPU-second",
            f"{args.threads} threads / 1 thread",
        ):
            ratios.add_column(col, justify="left" if col in ("policy", "input") else "right")
        for policy, label, one, many, rem in rows:
            ratios.add_row(
                policy,
                label,
                f"{rem['p50'] / one['p50']:.2f}x",
                f"{one['rate']:,.0f}",
                f"{1000 / one['cpu']:,.0f}",
                f"{many['rate'] / one['rate']:.2f}x",
            )
        console.print(ratios)

        dispatch = [r for r in rows if r[0] == "dispatch"]
        worst_p99 = max(one["p99"] for _, _, one, _, _ in dispatch)
        # one thread keeps one core busy: its rate is the per-core rate
        worst_rate = min(one["rate"] for _, _, one, _, _ in dispatch)
        worst_ratio = max(rem["p50"] / one["p50"] for _, _, one, _, rem in rows)
        goals = [
            (
                f"in-process dispatch p99 <= {P99_GOAL_MS:g} ms",
                f"{worst_p99:.3f} ms",
                worst_p99 <= P99_GOAL_MS,
            ),
            (
                f"in-process dispatch >= {RATE_GOAL:,} decisions/s per core",
                f"{worst_rate:,.0f}/s",
                worst_rate >= RATE_GOAL,
            ),
            (
                f"remote p50 within {REMOTE_RATIO_GOAL:g}x of in-process",
                f"{worst_ratio:.2f}x",
                worst_ratio <= REMOTE_RATIO_GOAL,
            ),
        ]
        gt = Table(title="Goals (worst case over the inputs)")
        for col in ("goal", "measured", "met"):
            gt.add_column(col)
        for goal, measured, met in goals:
            gt.add_row(goal, measured, "[green]yes[/green]" if met else "[red]NO[/red]")
        console.print(gt)
        console.print(NOTE)
        console.print(
            f"Load average (1 min) on {os.cpu_count()} CPUs: {load_before:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} after the runs; above ~1 other processes shared the cores."
        )
        console.print(
            "TCP_NODELAY in the OPA test server: "
            + (
                "off (--nagle): each response waits ~40 ms for a delayed ACK"
                if args.nagle
                else "on, as in Go's net/http"
            )
        )

        if args.breakdown:
            for policy, label, doc, _ in inputs:
                if not label.startswith("allow"):
                    continue
                bt = Table(
                    title=f"Where the time goes: {policy} {label}, "
                    f"{args.breakdown:,} rounds, stages interleaved"
                )
                bt.add_column("stage")
                bt.add_column("p50 ms", justify="right")
                for stage, p50 in breakdown(bundle, inproc, remote, policy, doc, args.breakdown):
                    bt.add_row(stage, f"{p50:.4f}")
                console.print(bt)
    finally:
        stop.set()
        server.join(timeout=10)
        if server.is_alive():
            server.terminate()
    cached_dispatch(bundle, args.inprocess)
    contract_checks(bundle, args.inprocess)


def cached_dispatch(bundle: PolicyBundle, n: int) -> None:
    """The gateway's path: VerdictCache in front of the engine (policy/cache.py). Requests
    repeat but `now` moves on every one, as in production."""
    from charter.policy.cache import VerdictCache

    engine = InProcessEngine(bundle)
    base = next(doc for policy, label, doc, _ in load_inputs()
                if policy == "dispatch" and label.startswith("allow"))
    table = Table(title=f"dispatch with the verdict cache, {n:,} decisions, `now` moving")
    for column in ("path", "dec/s", "p50 ms", "p99 ms", "hit rate"):
        table.add_column(column, justify="right")
    for label, use_cache in (("engine only", False), ("verdict cache", True)):
        cache = VerdictCache()
        times = []
        for i in range(n):
            doc = {**base, "now": base["now"] + i}  # a second later each time
            started = time.perf_counter()
            key = VerdictCache.key(engine.revision, "dispatch", doc) if use_cache else None
            verdict = cache.get(key, doc) if key else None
            if verdict is None:
                verdict = engine.evaluate("dispatch", doc)
                if key:
                    cache.put(key, doc, verdict)
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        hits = cache.hits / max(1, cache.hits + cache.misses)
        table.add_row(label, f"{n / (sum(times) / 1000):,.0f}", f"{pct(times, 0.5):.3f}",
                      f"{pct(times, 0.99):.3f}", f"{hits:.1%}" if use_cache else "-")
    Console().print(table)


def contract_checks(bundle: PolicyBundle, n: int) -> None:
    """What the input contracts (charter.policy.contracts) add to a decision: the schema
    check of each shared input, beside the in-process engine's decision on it."""
    from charter.policy.contracts import Contracts

    contracts, engine = Contracts(bundle), InProcessEngine(bundle)
    table = Table(title=f"input contract check vs in-process decision, {n:,} each, medians")
    for column in ("policy", "input", "schema check ms", "decision ms", "check / decision"):
        table.add_column(column, justify="right")
    worst = 0.0
    for policy, label, doc, _ in load_inputs():
        checks, decisions = [], []
        for _ in range(n):
            started = time.perf_counter()
            contracts.check(policy, doc)
            checks.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            engine.evaluate(policy, doc)
            decisions.append((time.perf_counter() - started) * 1000)
        check, decision = statistics.median(checks), statistics.median(decisions)
        worst = max(worst, check)
        table.add_row(policy, label, f"{check:.4f}", f"{decision:.4f}",
                      f"{check / decision:.2f}")
    Console().print(table)
    Console().print(f"schema check, worst median: {worst * 1000:.1f} µs per decision "
                    f"(goal <= 50 µs): {'ok' if worst <= 0.05 else 'MISSED'}")


if __name__ == "__main__":
    main()
