"""The audit chain's head, Charter's one serial point past one machine: how many events and
transactions a second the real group-commit writer (charter.audit.writer, one call of
charter_audit_append a transaction on PostgreSQL) achieves as writers are added, and how
its batches grow with load.

Processes stand for `charter serve` instances (pods), each with its own runtime and group
writer; threads for a worker's concurrent requests. Every entry is what a gateway request
commits before it is sent: two events (the policy decision and its dispatch outcome, here
committed together). Side by side, for 1, 2 and 4 processes of 1, 8 and 32 threads: events
per second, transactions per second, entries per transaction (the batch), and the commit
time at the median and p99. Numbers are this machine's, with its PostgreSQL at its own
settings (fsync on).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import threading
import time
from typing import Any

import gateway as gw
from results import emit, figure
from rich.console import Console
from rich.table import Table

SHAPES = ((1, 1), (1, 8), (1, 32), (2, 8), (2, 32), (4, 8), (4, 32))


def _writer_process(database_url: str, threads: int, seconds: float, out: Any) -> None:
    from charter import scope
    from charter.audit.journal import Event
    from charter.audit.writer import Entry
    from charter.boot import build_runtime
    from charter.settings import Settings

    settings = Settings.from_env({}, database_url=database_url, secret_key=gw.SECRET,
                                 log_level="WARNING")
    runtime = build_runtime(settings)
    batches: list[int] = []
    times: list[float] = []
    lock = threading.Lock()
    runtime.writer._on_commit = lambda s, n: (lock.acquire(), batches.append(n),  # noqa: SLF001
                                              times.append(s), lock.release())
    done = [0] * threads
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        with scope.bound(runtime):
            while time.monotonic() < stop:
                entry = Entry(events=(
                    Event.of(actor="service:bench", action="policy.decide",
                             target_type="deployment", target_id="bench", outcome="success",
                             details={"policy": "dispatch", "allow": True, "thread": i}),
                    Event.of(actor="service:bench", action="dispatch.outcome",
                             target_type="deployment", target_id="bench", outcome="success",
                             details={"status": 200, "tokens_in": 4, "tokens_out": 8})))
                runtime.writer.commit(entry)
                if entry.result == "written":
                    done[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    started = time.monotonic()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    elapsed = time.monotonic() - started
    out.put({"entries": sum(done), "seconds": elapsed, "batches": batches, "times": times})
    runtime.close()


def _run(database_url: str, processes: int, threads: int, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer_process, args=(database_url, threads, seconds, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    entries = sum(r["entries"] for r in results)
    wall = max(r["seconds"] for r in results)
    batches = [b for r in results for b in r["batches"]]
    times = sorted(t * 1000 for r in results for t in r["times"])
    return {"processes": processes, "threads": threads, "entries_s": entries / wall,
            "events_s": 2 * entries / wall, "tx_s": len(batches) / wall,
            "batch_mean": statistics.fmean(batches) if batches else 0.0,
            "batch_max": max(batches, default=0),
            "commit_p50_ms": times[len(times) // 2] if times else 0.0,
            "commit_p99_ms": times[int(len(times) * 0.99)] if times else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0, help="per shape")
    args = ap.parse_args()
    console = Console(width=max(Console().width, 120))
    name = f"charter_bench_head_{os.getpid()}"
    url = gw._create_database(name)  # migrated to head
    try:
        rows = [_run(url, p, t, args.seconds) for p, t in SHAPES]
    finally:
        gw._drop_database(name)
    table = Table(title=f"the audit head through the group-commit writer, {args.seconds:g} s "
                  "a shape; an entry = a request's two events")
    for col in ("processes x threads", "events/s", "transactions/s", "entries/transaction",
                "largest batch", "commit p50 ms", "commit p99 ms"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['processes']} x {r['threads']}", f"{r['events_s']:,.0f}",
                      f"{r['tx_s']:,.0f}", f"{r['batch_mean']:.1f}", str(r["batch_max"]),
                      f"{r['commit_p50_ms']:.2f}", f"{r['commit_p99_ms']:.2f}")
    console.print(table)
    best = max(rows, key=lambda r: r["events_s"])
    console.print(f"ceiling here: {best['events_s']:,.0f} events/s "
                  f"({best['entries_s']:,.0f} gateway requests/s) at "
                  f"{best['processes']} x {best['threads']}, batches of "
                  f"{best['batch_mean']:.1f}; {gw._machine()}; load "
                  f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    emit("audit_head", [figure("audit head ceiling", best["events_s"], "events/s"),
                        figure("requests/s the head carries", best["entries_s"], "req/s")],
         shapes=rows)


if __name__ == "__main__":
    main()
