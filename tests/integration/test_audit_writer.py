"""The gateway's group-commit audit writer: exact counts, exact quotas, a whole chain."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from sqlalchemy import select

from charter import scope
from charter.audit.chain import hash_parts
from charter.audit.journal import CHAIN_LOCK_KEY, Event
from charter.audit.service import (
    EventFilter,
    list_events,
    verify_chain,
)
from charter.audit.writer import Entry
from charter.db import utcnow
from charter.metering.models import Usage
from charter.metering.service import UsageDelta
from charter.readcache import current_generation as read_generation
from charter.uow import record, unit_of_work


def _event(i: int, action: str = "dispatch.test") -> Event:
    return Event.of(actor="user:bench", action=action, target_type="deployment",
                    target_id="m", details={"i": i})


def _threads(n: int, work: Callable[[int], None]) -> list[BaseException]:
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    # Each thread runs in a copy of this context: the test's Runtime is bound there too.
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(run, i))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        if t.is_alive():
            errors.append(TimeoutError(f"{t.name} never returned"))
    return errors


def test_concurrent_commits_share_transactions_and_keep_the_chain(configured) -> None:  # type: ignore[no-untyped-def]
    writer = scope.current().writer
    day = utcnow().date()
    before = writer.batches

    def work(i: int) -> None:
        for j in range(10):
            entry = writer.commit(Entry(
                events=(_event(i * 100 + j),),
                usage=(UsageDelta("t1", "m", day, requests=1),)))
            assert entry.result == "written" and len(entry.seqs) == 1
            writer.defer(Entry(events=(_event(i * 100 + j, "dispatch.outcome"),),
                               usage=(UsageDelta("t1", "m", day, tokens_in=2, tokens_out=3),)))
            with unit_of_work() as session:  # an ordinary change's event, same chain lock
                record(session, actor="system", action="registry.test", target_type="x",
                       target_id=str(i))

    assert _threads(8, work) == []
    assert writer.flush()
    verdict = verify_chain()
    assert verdict.ok and verdict.count == 8 * 10 * 3
    assert len(list_events(EventFilter(action="dispatch.test", limit=500))) == 80
    assert len(list_events(EventFilter(action="dispatch.outcome", limit=500))) == 80
    assert writer.batches - before < 160  # outcomes rode along with decisions
    with unit_of_work() as session:
        row = session.scalar(select(Usage).where(Usage.team_id == "t1"))
        assert (row.requests, row.tokens_in, row.tokens_out) == (80, 160, 240)


def test_many_waiters_each_get_their_own_answer(configured) -> None:  # type: ignore[no-untyped-def]
    writer = scope.current().writer
    seqs: list[int] = []

    def work(i: int) -> None:
        for j in range(20):
            writer.defer(Entry(events=(_event(i * 1000 + j, "dispatch.outcome"),)))
            entry = writer.commit(Entry(events=(_event(i * 1000 + j),)))
            assert entry.result == "written", entry.result
            seqs.extend(entry.seqs)

    assert _threads(32, work) == []
    assert writer.flush()
    assert len(seqs) == len(set(seqs)) == 640
    assert verify_chain().count == 1280


def test_quota_is_exact_under_concurrency(configured) -> None:  # type: ignore[no-untyped-def]
    writer = scope.current().writer
    day = utcnow().date()
    results: list[str] = []

    def work(i: int) -> None:
        for j in range(5):
            refused = Event.of(actor="user:x", action="dispatch.refused",
                               target_type="deployment", target_id="m", outcome="denied",
                               details={"code": "quota_exceeded"})
            entry = writer.commit(Entry(events=(_event(i * 10 + j),),
                                        usage=(UsageDelta("t2", "m", day, requests=1),),
                                        quota=("t2", 17), over_quota=(refused,)))
            results.append(entry.result)

    assert _threads(8, work) == []
    assert sorted(results).count("written") == 17 and results.count("over_quota") == 23
    assert len(list_events(EventFilter(action="dispatch.refused", limit=100))) == 23
    with unit_of_work() as session:
        assert session.scalar(select(Usage.requests).where(Usage.team_id == "t2")) == 17
    assert verify_chain().ok


def test_an_entry_decided_on_an_old_generation_is_not_written(configured, pg_conn) -> None:  # type: ignore[no-untyped-def]
    writer = scope.current().writer
    generation = read_generation()
    pg_conn.execute("UPDATE teams SET description = 'changed'")  # bumps the generation
    entry = writer.commit(Entry(events=(_event(1),), generation=generation))
    assert entry.result == "stale" and entry.generation_seen == generation + 1
    assert entry.seqs == [] and list_events(EventFilter(action="dispatch.test")) == []
    # Nothing was written, and the transaction did not stay open holding the chain lock.
    pg_conn.execute("SET lock_timeout = '2s'")
    pg_conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK_KEY,))
    fresh = writer.commit(Entry(events=(_event(2),), generation=entry.generation_seen))
    assert fresh.result == "written"


def test_database_away_fails_commits_and_keeps_deferred_outcomes(configured) -> None:  # type: ignore[no-untyped-def]
    writer = scope.current().writer
    assert writer.commit(Entry(events=(_event(0),))).result == "written"
    dbname = scope.current().database.engine.url.database
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres",
                         autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
    writer.defer(Entry(events=(_event(1, "dispatch.outcome"),)))
    # The writer's connection was cut: this transaction fails, the next one reconnects.
    first = writer.commit(Entry(events=(_event(2),)))
    assert first.result == "failed" and first.seqs == []
    assert first.error is not None and first.error.code == "audit_unavailable"
    again = writer.commit(Entry(events=(_event(3),)))
    assert again.result == "written"
    assert writer.flush()
    outcomes = list_events(EventFilter(action="dispatch.outcome"))
    assert [e.details["i"] for e in outcomes] == [1]  # kept, written once
    assert verify_chain().ok


def test_refuses_what_is_not_plain_json(configured) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        Event.of(actor="a", action="b", target_type="c", target_id="d",
                 details={"f": float("nan")})


@pytest.fixture
def sqlite_db(tmp_path):  # type: ignore[no-untyped-def]
    from charter import migrate
    from charter.settings import Settings
    from tests.runtimes import bind_runtime, release_runtime

    url = f"sqlite:///{tmp_path / 'w.db'}"
    migrate.upgrade(url)
    bind_runtime(Settings.from_env({}, database_url=url, secret_key="s" * 40))
    yield url
    release_runtime()


def test_the_embedded_database_gets_the_same_guarantees(sqlite_db) -> None:  # type: ignore[no-untyped-def]
    """SQLite (the demo): same chain, same quota, stale entries written nowhere."""
    from sqlalchemy import text

    writer = scope.current().writer
    day = utcnow().date()
    generation = read_generation()
    refused = Event.of(actor="user:x", action="dispatch.refused", target_type="deployment",
                       target_id="m", outcome="denied", details={"code": "quota_exceeded"})
    results = [writer.commit(Entry(events=(_event(i),), generation=generation,
                                   usage=(UsageDelta("t3", "m", day, requests=1),),
                                   quota=("t3", 2), over_quota=(refused,))).result
               for i in range(3)]
    assert results == ["written", "written", "over_quota"]
    with unit_of_work() as session:
        session.execute(text("UPDATE change_generation SET value = value + 1"))
    stale = writer.commit(Entry(events=(_event(4),), generation=generation))
    assert stale.result == "stale" and stale.generation_seen == generation + 1
    with unit_of_work() as session:  # the writer's empty transaction is over: others write
        record(session, actor="system", action="registry.test", target_type="x", target_id="1")
    writer.defer(Entry(events=(_event(9, "dispatch.outcome"),),
                       usage=(UsageDelta("t3", "m", day, tokens_out=4),)))
    assert writer.flush()
    with unit_of_work() as session:
        row = session.scalar(select(Usage).where(Usage.team_id == "t3"))
        assert (row.requests, row.tokens_out) == (2, 4)
    assert [e.action for e in list_events(EventFilter(limit=10))] == [
        "dispatch.test", "dispatch.test", "dispatch.refused", "registry.test",
        "dispatch.outcome"]
    assert verify_chain().ok


def test_an_entry_the_table_refuses_does_not_sink_its_batch(configured) -> None:  # type: ignore[no-untyped-def]
    writer = scope.current().writer
    # Past Event.of's checks (as a future bug might be): a target id longer than its column.
    long_id = "x" * 300
    bad = Event("user:x", "dispatch.outcome", "deployment", long_id, "success", {}, None,
                b"{}", hash_parts(actor="user:x", action="dispatch.outcome",
                                  target_type="deployment", target_id=long_id,
                                  outcome="success", request_id=None),
                "0" * 32, None)
    writer.defer(Entry(events=(bad,)))
    writer.defer(Entry(events=(_event(1, "dispatch.outcome"),)))
    entry = writer.commit(Entry(events=(_event(2),)))
    assert entry.result == "written" and len(entry.seqs) == 1
    assert writer.flush()  # the refused one is dropped (logged), not retried forever
    assert [e.details["i"] for e in list_events(EventFilter(limit=10))] == [1, 2]
    assert verify_chain().ok


HOSTILE = ["plain", "ünïcödé ✓ 日本語", "emoji 🧪🔒", 'quote " and \\ backslash',
           "line\nbreak\r\nand\ttab", "\x1b[31mANSI\x1b[0m", "bidi \u202e\u2066 marks",
           "\u2028\u2029 separators", "control \x01\x1f\x7f", "</script><!--", "x" * 199]


def test_the_database_chains_hostile_text_as_python_would(configured) -> None:  # type: ignore[no-untyped-def]
    """charter_audit_append joins the RFC 8785 parts in SQL: every field, with text of
    every awkward kind, must hash there exactly as audit.chain hashes it here."""
    writer = scope.current().writer
    for i, text in enumerate(HOSTILE):
        deferred = Event.of(actor=f"user:{text}"[:200], action="dispatch.outcome",
                            target_type="deployment", target_id=text, outcome="success",
                            details={"text": text, "nested": {text: [text, 1, 2.5, None]},
                                     "n": -(2**53 - 1)}, request_id=f"r-{i}")
        writer.defer(Entry(events=(deferred,)))
        entry = writer.commit(Entry(events=(Event.of(
            actor="user:x", action="dispatch.test", target_type=text[:50], target_id="m",
            details={"i": i, "text": text}, request_id=None),)))
        assert entry.result == "written"
    assert writer.flush()
    verdict = verify_chain()
    assert verdict.ok and verdict.count == 2 * len(HOSTILE), verdict
    events = list_events(EventFilter(limit=100))
    assert [e.target_id for e in events if e.action == "dispatch.outcome"] == HOSTILE
    assert [e.details["text"] for e in events if e.action == "dispatch.test"] == HOSTILE
    # Stamped by the database under the chain lock: times never go back along the chain.
    stamps = [e.ts for e in events]
    assert stamps == sorted(stamps)


def test_the_database_function_waits_on_the_services_chain_lock(configured, pg_conn) -> None:  # type: ignore[no-untyped-def]
    """Migration 0010 keeps its own copy of the chain lock's key (a migration must not
    follow later code): while another transaction holds audit.service's lock, the
    gateway's commit waits, so the two writers can never fork the chain."""
    writer = scope.current().writer
    results: list[str] = []
    with pg_conn.transaction():
        pg_conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK_KEY,))
        thread = threading.Thread(
            target=lambda: results.append(writer.commit(Entry(events=(_event(1),))).result))
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive() and results == []  # blocked on the same lock
    thread.join(timeout=10)
    assert results == ["written"] and verify_chain().ok


def _usage_per_key(writer: Any) -> list[tuple[str, int, int, int]]:
    day = utcnow().date()
    for key, est in (("aaaaaaaaaaaaaaaa", 0), ("bbbbbbbbbbbbbbbb", 5), ("", 0)):
        assert writer.commit(Entry(events=(_event(len(key) + est),), usage=(
            UsageDelta("t9", "m", day, requests=1, key_id=key),))).result == "written"
        writer.defer(Entry(events=(_event(99, "dispatch.outcome"),), usage=(
            UsageDelta("t9", "m", day, tokens_in=2, tokens_out=3, key_id=key,
                       tokens_estimated=est),)))
    assert writer.flush()
    with unit_of_work() as session:
        return [(u.key_id, u.requests, u.tokens_out, u.tokens_estimated)
                for u in session.scalars(select(Usage).where(Usage.team_id == "t9")
                                         .order_by(Usage.key_id))]


PER_KEY = [("", 1, 3, 0), ("aaaaaaaaaaaaaaaa", 1, 3, 0), ("bbbbbbbbbbbbbbbb", 1, 3, 5)]


def test_usage_is_counted_per_key_with_its_estimated_part(configured) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL's charter_audit_append (migration 0017) counts per key, and how many of
    the tokens were Charter's estimate; the quota still sums the team's keys."""
    assert _usage_per_key(scope.current().writer) == PER_KEY


def test_the_embedded_database_counts_per_key_alike(sqlite_db) -> None:  # type: ignore[no-untyped-def]
    assert _usage_per_key(scope.current().writer) == PER_KEY
