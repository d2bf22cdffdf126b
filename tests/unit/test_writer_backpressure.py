"""The group writer's outcome backlog: back-pressure when full, then a counted, alarmed
drop; never a silent one. A backend stands in for the database (its failure modes are
the point here; tests/integration/test_audit_writer.py runs the real ones)."""

from __future__ import annotations

import threading
from datetime import date

import psycopg
from structlog.testing import capture_logs

from charter.audit.journal import Event
from charter.audit.writer import Entry, GroupWriter, _Backend


class Away(_Backend):
    """A database that is away until `back` is set."""

    def __init__(self) -> None:
        self.back = threading.Event()
        self.written: list[Entry] = []

    def append(self, batch: list[Entry], day: date) -> None:
        if not self.back.is_set():
            raise psycopg.OperationalError("connection refused")
        for e in batch:
            e.result = "written"
            self.written.append(e)


def _outcome(i: int) -> Entry:
    return Entry(events=(Event.of(actor="key:bot", action="dispatch.outcome",
                                  target_type="deployment", target_id=f"m{i}"),))


def test_a_full_backlog_waits_then_drops_counted_and_logged() -> None:
    backend = Away()
    drops: list[str] = []
    writer = GroupWriter(backend, linger_s=0.01, max_deferred=2,
                         on_drop=lambda _e, reason: drops.append(reason))
    try:
        assert writer.defer(_outcome(1)) and writer.defer(_outcome(2))
        with capture_logs() as logs:
            assert writer.defer(_outcome(3), wait_s=0.3) is False  # no room came
        assert writer.dropped == 1 and drops == ["backlog_full"]
        dropped = [e for e in logs if e["event"] == "audit events dropped"]
        assert dropped and dropped[0]["log_level"] == "error"
        assert dropped[0]["reason"] == "backlog_full"
        assert dropped[0]["actions"] == ["dispatch.outcome"]
    finally:
        backend.back.set()
        writer.close()
    assert len(backend.written) == 2  # the two it kept were written once it came back


def test_room_that_frees_up_ends_the_wait_and_nothing_is_dropped() -> None:
    backend = Away()
    drops: list[str] = []
    writer = GroupWriter(backend, linger_s=0.01, max_deferred=2,
                         on_drop=lambda _e, reason: drops.append(reason))
    results: list[bool] = []
    try:
        assert writer.defer(_outcome(1)) and writer.defer(_outcome(2))
        waiting = threading.Thread(target=lambda: results.append(
            writer.defer(_outcome(3), wait_s=30)))
        waiting.start()
        waiting.join(timeout=0.2)
        assert waiting.is_alive() and results == []  # held back while the backlog is full
        backend.back.set()  # the database comes back: room frees up
        waiting.join(timeout=30)
        assert results == [True]
        assert writer.flush()
    finally:
        writer.close()
    assert writer.dropped == 0 and drops == []
    assert len(backend.written) == 3


def test_an_outcome_the_database_keeps_refusing_is_dropped_counted() -> None:
    class Refuses(_Backend):
        def append(self, batch: list[Entry], day: date) -> None:
            raise psycopg.DataError("value too long")

    drops: list[str] = []
    writer = GroupWriter(Refuses(), linger_s=0.01,
                         on_drop=lambda _e, reason: drops.append(reason))
    try:
        writer.defer(_outcome(1))
        writer.flush()
    finally:
        writer.close()
    assert drops == ["refused_by_database"] and writer.dropped == 1
