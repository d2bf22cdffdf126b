"""Benchmark: verifying an exported audit bundle offline, beside the floor any verifier pays.

Builds a log of --events dispatch-like events on PostgreSQL (a checkpoint every 1,000),
walks it in the database (charter audit verify, with and without the seal key), exports
it whole (compressed and stored), then, in this one process, times:
- charter-verify's verify_bundle on each bundle (every signature, digest, line and proof);
- the floor: one SHA-256 call per event over its canonical bytes (the bundle's lines);
- proof generation: an inclusion proof for a random event from the stored tree (what
  GET /api/v1/audit/proofs/inclusion computes, without HTTP), and export time per event.
Medians of --rounds runs. Goal: verification >= 100,000 events/s and within 5x the floor.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import psycopg
from results import emit, figure
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from charter import migrate, scope
from charter.audit import checkpoints
from charter.audit.bundle import Selection, export
from charter.audit.checkpoints import generate_key
from charter.audit.seal import make_seal_keys, verifier_from_file, write_new
from charter.audit.service import verify_chain
from charter.audit.tree import Tree
from charter.audit.verify import verify_bundle
from charter.boot import build_runtime
from charter.settings import Settings
from charter.uow import record, unit_of_work

RATE_GOAL = 100_000
FLOOR_GOAL = 5.0


def fill(n: int, every: int, settings: Settings) -> None:
    """n events like the gateway's outcome events, committed 1,000 at a time."""
    rnd = random.Random(7)
    for start in range(0, n, every):
        with unit_of_work() as session:
            for i in range(start, min(n, start + every)):
                record(
                    session, actor=f"key:svc-{i % 17}", action="dispatch.outcome",
                    target_type="deployment", target_id=f"chat-{i % 5}",
                    details={"outcome": "completed", "status": 200,
                             "decision_id": f"{rnd.getrandbits(128):032x}",
                             "node": f"node-eu-{i % 3}", "region": "eu-central",
                             "team": f"team-{i % 7}", "data_class": "internal",
                             "purpose": "assistant", "tokens_in": 40 + i % 90,
                             "tokens_out": i % 400, "ttft_ms": 12.5 + i % 30,
                             "latency_ms": 250.25 + i % 900,
                             "request_digest": hashlib.sha256(str(i).encode()).hexdigest(),
                             "stream": bool(i % 2), "error": ""})
        checkpoints.issue(settings, force=True)


def median_time(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()
    console = Console()
    name = f"charter_bench_verify_{os.getpid()}"
    url = make_url(args.admin_url).set(drivername="postgresql+psycopg", database=name)
    url_s = url.render_as_string(hide_password=False)
    with psycopg.connect(args.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    folder = Path(tempfile.mkdtemp())
    try:
        key = folder / "key.pem"
        generate_key(key)
        seal_keys = make_seal_keys(900)
        write_new(folder / "seal.json", seal_keys.sealing)
        write_new(folder / "verify.json", seal_keys.verification)
        seal_key = verifier_from_file(str(folder / "verify.json"))
        settings = Settings.from_env({}, database_url=url_s, secret_key="x" * 32,
                                     audit_signing_keys=str(key),
                                     audit_seal_key=str(folder / "seal.json"))
        migrate.upgrade(url_s)
        scope.bind(build_runtime(settings))
        t0 = time.perf_counter()
        fill(args.events, 1000, settings)
        console.print(f"{args.events:,} events and {args.events // 1000} checkpoints written "
                      f"in {time.perf_counter() - t0:.1f}s; {os.cpu_count()} CPUs, load "
                      f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        trusted = [checkpoints.load_signers(settings)[0].verifier]
        # The database walk (charter audit verify): the chain, the tree against all 100
        # checkpoints, seal presence; then with the auditors' key, every seal.
        walk = {}
        for label, key in (("walk", None), ("walk, seals checked", seal_key)):
            verdict = verify_chain(seal_key=key)
            assert verdict.ok and verdict.count == args.events, verdict
            walk[label] = median_time(lambda key=key: verify_chain(seal_key=key),
                                      args.rounds)

        bundles = {}
        export_s = {}
        for label, compress in (("deflated", True), ("stored", False)):
            out = io.BytesIO()
            export_s[label] = median_time(
                lambda out=out, compress=compress: (out.seek(0), out.truncate(),
                                                    export(settings, Selection(), out,
                                                           compress=compress)), 1)
            bundles[label] = out.getvalue()
        with zipfile.ZipFile(io.BytesIO(bundles["stored"])) as z:
            lines = z.read("events.jsonl").split(b"\n")[:-1]
        assert len(lines) == args.events
        mean_bytes = sum(map(len, lines)) / len(lines)

        sha = hashlib.sha256
        floor = median_time(lambda: [sha(line).digest() for line in lines], args.rounds)
        def inflate() -> None:
            with zipfile.ZipFile(io.BytesIO(bundles["deflated"])) as z:
                z.read("events.jsonl")

        inflate_s = median_time(inflate, args.rounds)
        verify = {}
        for label, data in bundles.items():
            report = verify_bundle(data, trusted)
            assert report.ok and report.events == args.events, report.findings
            verify[label] = median_time(lambda data=data: verify_bundle(data, trusted),
                                        args.rounds)
        # The auditors' check of every seal too (an HMAC and the event's sealed content).
        sealed_report = verify_bundle(bundles["stored"], trusted, seal_key=seal_key)
        assert sealed_report.ok, sealed_report.findings
        verify["stored, seals checked"] = median_time(
            lambda: verify_bundle(bundles["stored"], trusted, seal_key=seal_key), args.rounds)

        seqs = random.Random(1).sample(range(1, args.events + 1), 1000)

        def proofs() -> None:
            for s in seqs:
                with unit_of_work() as session:
                    Tree(session.connection()).inclusion(s - 1, args.events)

        proof_s = median_time(proofs, 3) / len(seqs)

        n = args.events
        table = Table(title=f"bundle verification, {n:,} events ({mean_bytes:.0f} bytes each), "
                      f"medians of {args.rounds}")
        for col in ("what", "seconds", "events/s", "x floor", "bundle MB"):
            table.add_column(col, justify="right")
        table.add_row("floor: SHA-256 of each event's bytes", f"{floor:.3f}",
                      f"{n / floor:,.0f}", "1.00", "")
        table.add_row("floor + inflating events.jsonl", f"{floor + inflate_s:.3f}",
                      f"{n / (floor + inflate_s):,.0f}", f"{(floor + inflate_s) / floor:.2f}",
                      "")
        for label in ("stored", "deflated", "stored, seals checked"):
            table.add_row(f"verify_bundle ({label})", f"{verify[label]:.3f}",
                          f"{n / verify[label]:,.0f}", f"{verify[label] / floor:.2f}",
                          f"{len(bundles[label.split(',')[0]]) / 1e6:.1f}")
        table.add_row("deflated, beside floor + inflating", "", "",
                      f"{verify['deflated'] / (floor + inflate_s):.2f}", "")
        console.print(table)
        walked = Table(title=f"database walk (charter audit verify), {n:,} events, "
                       f"medians of {args.rounds}")
        for col in ("what", "seconds", "events/s"):
            walked.add_column(col, justify="right")
        for label, took in walk.items():
            walked.add_row(label, f"{took:.3f}", f"{n / took:,.0f}")
        console.print(walked)
        gen = Table(title="proof generation")
        for col in ("what", "per event"):
            gen.add_column(col, justify="right")
        gen.add_row("inclusion proof, stored tree, own transaction", f"{proof_s * 1e6:.0f} µs")
        for label in ("deflated", "stored"):
            gen.add_row(f"export ({label}), whole log", f"{export_s[label] / n * 1e6:.1f} µs")
        console.print(gen)
        emit("verify", [
            figure("bundle verification (stored), events/s", n / verify["stored"], "/s",
                   baseline="SHA-256 per event", baseline_value=n / floor,
                   goal=">= 100,000/s, within 5x the floor",
                   met=n / verify["stored"] >= RATE_GOAL
                   and verify["stored"] / floor <= FLOOR_GOAL,
                   note=f"{verify['stored'] / floor:.1f}x the floor's time"),
            figure("bundle verification (deflated), events/s", n / verify["deflated"], "/s",
                   baseline="SHA-256 + inflate", baseline_value=n / (floor + inflate_s)),
            figure("bundle verification (stored, seals checked), events/s",
                   n / verify["stored, seals checked"], "/s",
                   baseline="SHA-256 per event", baseline_value=n / floor,
                   goal=">= 100,000/s", met=n / verify["stored, seals checked"] >= RATE_GOAL),
            figure("database walk (charter audit verify), events/s", n / walk["walk"], "/s",
                   goal=">= 100,000/s", met=n / walk["walk"] >= RATE_GOAL),
            figure("database walk, seals checked, events/s",
                   n / walk["walk, seals checked"], "/s"),
            figure("inclusion proof from the stored tree", proof_s * 1e3, "ms")],
            events=n, bytes_per_event=round(mean_bytes))
        best = min(verify.values())
        ok_rate = n / best >= RATE_GOAL
        ok_floor = best / floor <= FLOOR_GOAL
        console.print(
            f"goal >= {RATE_GOAL:,} events/s: {'[green]ok[/]' if ok_rate else '[red]MISSED[/]'}"
            f"; within {FLOOR_GOAL:.0f}x the floor: "
            f"{'[green]ok[/]' if ok_floor else '[red]MISSED[/]'} (stored bundle; the "
            f"deflated one adds decompression)")
    finally:
        current = scope.maybe_current()
        if current is not None:
            current.close()
        with psycopg.connect(args.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
