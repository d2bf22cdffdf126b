"""Benchmark: chained audit appends vs plain inserts from concurrent processes, then verify."""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import queue
import secrets
import time
from datetime import datetime
from typing import Any

import psycopg
from results import emit, figure
from rich.console import Console
from rich.table import Table
from sqlalchemy import JSON, BigInteger, Identity, Index, MetaData, String, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter import migrate, scope
from charter.audit import service
from charter.audit.chain import ChainRow, canonical_json, event_hash
from charter.audit.models import AuditEvent
from charter.db import UTCDateTime, utcnow
from charter.settings import Settings
from charter.uow import record, unit_of_work

VERIFY_GOAL = 100_000  # events/s
ACTIONS = ("model.register", "version.submit", "version.approve", "deployment.create", "dispatch")


class _PlainBase(DeclarativeBase):
    metadata = MetaData()


class PlainEvent(_PlainBase):
    """Same columns and indexes as audit_events; seq from an identity, nothing chained."""

    __tablename__ = "plain_events"
    seq: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    actor: Mapped[str] = mapped_column(String(200), nullable=False)
    action: Mapped[str] = mapped_column(String(100), nullable=False)
    target_type: Mapped[str] = mapped_column(String(50), nullable=False)
    target_id: Mapped[str] = mapped_column(String(200), nullable=False)
    outcome: Mapped[str] = mapped_column(String(20), nullable=False)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    __table_args__ = (
        Index("ix_plain_events_actor_seq", "actor", "seq"),
        Index("ix_plain_events_action_seq", "action", "seq"),
        Index("ix_plain_events_target_seq", "target_type", "target_id", "seq"),
        Index("ix_plain_events_ts", "ts"),
    )


def _event(writer: int, i: int) -> dict[str, Any]:
    return {
        "actor": f"user:steward-{writer}@example.org",
        "action": ACTIONS[i % len(ACTIONS)],
        "target_type": "model_version",
        "target_id": f"mv-{writer:02d}-{i:06d}",
        "details": {
            "model": "tinyllama-1.1b-chat",
            "label": f"v{i % 17}",
            "regions": ["eu-west-1", "eu-central-1"],
            "data_classes": ["internal", "personal"],
            "tokens": 128 + i % 512,
            "latency_ms": 40 + i % 300,
            "node": f"node-{i % 4}",
        },
    }


def _writer(url: str, kind: str, writer: int, n: int, barrier: Any, out: Any) -> None:
    # Imported here: charter.boot brings Celery, whose billiard re-points __mp_main__ while
    # a spawned child is still importing this module (PlainEvent's annotations then fail).
    from charter.boot import build_runtime

    scope.bind(build_runtime(Settings.from_env({}, database_url=url, secret_key="x" * 32)))
    with unit_of_work() as session:  # connect before the clock starts
        session.execute(text("SELECT 1"))
    barrier.wait()
    t0, cpu0 = time.monotonic(), time.process_time()
    for i in range(n):
        ev = _event(writer, i)
        with unit_of_work() as session:
            if kind == "chained":
                record(session, **ev)
            else:
                fill = {"ts": utcnow(), "outcome": "success", "prev_hash": "0" * 64}
                session.add(PlainEvent(**ev, **fill, hash=secrets.token_hex(32)))
    out.put((t0, time.monotonic(), time.process_time() - cpu0))


def run_writers(url: str, kind: str, events: int, writers: int) -> tuple[float, float]:
    """(wall seconds from first start to last finish, writer CPU seconds in all)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(writers), ctx.Queue()
    share = [events // writers + (w < events % writers) for w in range(writers)]
    procs = [
        ctx.Process(target=_writer, args=(url, kind, w, share[w], barrier, out))
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    spans: list[tuple[float, float, float]] = []
    while len(spans) < writers:
        try:
            spans.append(out.get(timeout=1))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise SystemExit(f"a {kind} writer died") from None
    for p in procs:
        p.join()
    return max(s[1] for s in spans) - min(s[0] for s in spans), sum(s[2] for s in spans)


def profile_verify() -> dict[str, float]:
    """Seconds spent fetching rows vs hashing them, measured apart."""
    table = AuditEvent.__table__
    cols = [table.c[name] for name in ChainRow.__slots__]
    with scope.current().database.engine.connect() as conn:
        t0 = time.perf_counter()
        result = conn.execution_options(stream_results=True, yield_per=5000).execute(
            select(*cols).order_by(table.c.seq)
        )
        rows = [ChainRow(*r) for r in result]
        fetch = time.perf_counter() - t0
    t0 = time.perf_counter()
    bodies = [r.body() for r in rows]
    body = time.perf_counter() - t0
    t0 = time.perf_counter()
    blobs = [canonical_json(b) for b in bodies]
    canon = time.perf_counter() - t0
    t0 = time.perf_counter()
    for blob in blobs:
        hashlib.sha256(blob).hexdigest()
    sha = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in rows:
        assert event_hash(r.body()) == r.hash
    hashing = time.perf_counter() - t0
    return {
        "row fetch (SQL + JSON + datetime + ChainRow)": fetch,
        "hashing total (event_hash(row.body()))": hashing,
        "  of which row.body()": body,
        "  of which canonical_json": canon,
        "  of which sha256": sha,
        "rows": len(rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4, help="alternating chained/plain rounds")
    ap.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()
    name = f"charter_bench_{os.getpid()}"
    url = make_url(args.admin_url).set(drivername="postgresql+psycopg", database=name)
    url_s = url.render_as_string(hide_password=False)
    console = Console()
    with psycopg.connect(args.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        migrate.upgrade(url_s)
        from charter.boot import build_runtime  # see _writer

        runtime = build_runtime(Settings.from_env({}, database_url=url_s, secret_key="x" * 32))
        scope.bind(runtime)
        _PlainBase.metadata.create_all(runtime.database.engine)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        console.print(
            f"{args.events} events, {args.writers} writer processes, {args.rounds} rounds, "
            f"db {name}, {os.cpu_count()} CPUs, load average before: {load}"
        )
        # Alternate rounds so that a change in machine load hits both paths alike.
        spent = {"chained": [0.0, 0.0], "plain": [0.0, 0.0]}
        for r in range(args.rounds):
            n = args.events // args.rounds + (r < args.events % args.rounds)
            for kind, acc in spent.items():
                wall, cpu = run_writers(url_s, kind, n, args.writers)
                acc[0] += wall
                acc[1] += cpu
        chained, plain = (args.events / spent[k][0] for k in ("chained", "plain"))
        chained_cpu, plain_cpu = (1000 * spent[k][1] / args.events for k in ("chained", "plain"))
        table = Table(title="audit append")
        for col in ("path", "events/s", "ratio", "writer CPU ms/event"):
            table.add_column(col, justify="right")
        ratio = f"{chained / plain:.3f}"
        table.add_row("chained (uow.record)", f"{chained:,.0f}", ratio, f"{chained_cpu:.2f}")
        table.add_row("plain INSERT", f"{plain:,.0f}", "1.000", f"{plain_cpu:.2f}")
        console.print(table)
        verdict_ok = "[green]ok[/]" if chained / plain >= 0.5 else "[red]MISSED[/]"
        console.print(f"goal chained >= 0.5 x plain: {verdict_ok}")

        t0 = time.perf_counter()
        verdict = service.verify_chain()
        took = time.perf_counter() - t0
        assert verdict.ok, verdict
        assert verdict.count == args.events, verdict.count
        rate = verdict.count / took
        mark = "[green]ok[/]" if rate >= VERIFY_GOAL else "[red]MISSED[/]"
        console.print(
            f"verify_chain: {verdict.count} events in {took:.3f}s = "
            f"{rate:,.0f} events/s (goal {VERIFY_GOAL:,}): {mark}"
        )
        emit("audit_append", [
            figure("chained audit append (uow.record), events/s", chained, "/s",
                   baseline="plain INSERT", baseline_value=plain, goal=">= 0.5x plain",
                   met=chained / plain >= 0.5),
            figure("verify_chain, events/s", rate, "/s", goal=f">= {VERIFY_GOAL:,}/s",
                   met=rate >= VERIFY_GOAL)], writers=args.writers, events=args.events)
        if rate < VERIFY_GOAL:
            prof = profile_verify()
            rows = prof.pop("rows")
            breakdown = Table(title="verify breakdown")
            for col in ("stage", "seconds", "events/s"):
                breakdown.add_column(col, justify="right")
            for stage, secs in prof.items():
                breakdown.add_row(stage, f"{secs:.3f}", f"{rows / secs:,.0f}")
            console.print(breakdown)
    finally:
        current = scope.maybe_current()
        if current is not None:
            current.close()
        with psycopg.connect(args.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
