"""The audit log on PostgreSQL: append-only triggers, tamper detection, concurrent writers."""

from __future__ import annotations

import contextvars
import threading

import psycopg
import pytest

from charter.audit.chain import GENESIS_HASH
from charter.audit.service import EventFilter, head, list_events, verify_chain
from charter.uow import record, unit_of_work


def _append(n: int, actor: str = "user:t") -> None:
    for i in range(n):
        with unit_of_work() as session:
            record(session, actor=actor, action="test.event", target_type="thing",
                   target_id=str(i), details={"i": i, "tags": ["a", "b"]})


def test_chain_links_and_head(configured) -> None:  # type: ignore[no-untyped-def]
    assert head() == (0, GENESIS_HASH)
    _append(5)
    events = list_events(EventFilter())
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:], strict=False))
    verdict = verify_chain()
    assert verdict.ok and verdict.count == 5 and verdict.head_hash == events[-1].hash


@pytest.mark.parametrize("statement", [
    "UPDATE audit_events SET outcome = 'denied' WHERE seq = 1",
    "DELETE FROM audit_events WHERE seq = 1",
    "TRUNCATE audit_events",
])
def test_triggers_refuse_changes(configured, pg_conn, statement) -> None:  # type: ignore[no-untyped-def]
    _append(2)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        pg_conn.execute(statement)
    assert verify_chain().count == 2


def _tamper(pg_conn: psycopg.Connection, *statements: str) -> None:
    # What a superuser could do: bypass the triggers.
    pg_conn.execute("SET session_replication_role = replica")
    for s in statements:
        pg_conn.execute(s)
    pg_conn.execute("SET session_replication_role = DEFAULT")


def test_edited_event_is_caught(configured, pg_conn) -> None:  # type: ignore[no-untyped-def]
    _append(6)
    _tamper(pg_conn, """UPDATE audit_events SET details = '{"i": 99, "tags": []}' WHERE seq = 4""")
    v = verify_chain()
    assert (v.ok, v.first_bad_seq, v.reason, v.count) == (False, 4, "edited", 3)


def test_edited_and_rehashed_event_is_caught(configured, pg_conn) -> None:  # type: ignore[no-untyped-def]
    """The attacker recomputes the edited row's hash; its successor no longer links."""
    from charter.audit.chain import ChainRow, event_hash

    _append(6)
    row = pg_conn.execute(
        "SELECT seq, ts, actor, action, target_type, target_id, outcome, details, request_id,"
        " prev_hash, hash FROM audit_events WHERE seq = 3").fetchone()
    forged = ChainRow(*row[:6], "denied", *row[7:])
    _tamper(pg_conn, f"UPDATE audit_events SET outcome = 'denied', "
                     f"hash = '{event_hash(forged.body())}' WHERE seq = 3")
    v = verify_chain()
    assert (v.ok, v.first_bad_seq, v.reason) == (False, 3, "edited")


def test_missing_event_is_caught(configured, pg_conn) -> None:  # type: ignore[no-untyped-def]
    _append(6)
    _tamper(pg_conn, "DELETE FROM audit_events WHERE seq = 2")
    v = verify_chain()
    assert (v.ok, v.first_bad_seq, v.reason, v.count) == (False, 2, "missing", 1)
    assert "event 2 is missing" in (v.message or "")


def test_reordered_events_are_caught(configured, pg_conn) -> None:  # type: ignore[no-untyped-def]
    _append(6)
    _tamper(pg_conn,
            "UPDATE audit_events SET seq = -1 WHERE seq = 4",
            "UPDATE audit_events SET seq = 4 WHERE seq = 5",
            "UPDATE audit_events SET seq = 5 WHERE seq = -1")
    v = verify_chain()
    assert (v.ok, v.first_bad_seq, v.reason) == (False, 4, "reordered")


def test_concurrent_writers_neither_fork_nor_leave_gaps(configured) -> None:  # type: ignore[no-untyped-def]
    writers, each = 8, 40
    errors: list[BaseException] = []
    barrier = threading.Barrier(writers)

    def work(w: int) -> None:
        try:
            barrier.wait()
            _append(each, actor=f"user:w{w}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(work, w))
               for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    verdict = verify_chain()
    assert verdict.ok and verdict.count == writers * each
    seqs = [e.seq for e in list_events(EventFilter(limit=1000))]
    assert seqs == list(range(1, writers * each + 1))


def test_event_rolls_back_with_its_change(configured) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError), unit_of_work() as session:
        record(session, actor="user:t", action="x", target_type="t", target_id="1")
        raise RuntimeError("the change failed")
    assert head() == (0, GENESIS_HASH)


def test_details_must_be_plain_json(configured) -> None:  # type: ignore[no-untyped-def]
    import datetime

    with pytest.raises(Exception), unit_of_work() as session:  # noqa: B017 - rfc8785 raises its own type
        record(session, actor="user:t", action="x", target_type="t", target_id="1",
               details={"when": datetime.datetime.now()})
    assert head()[0] == 0


def test_audit_api_filters_and_pages(client, make_person) -> None:  # type: ignore[no-untyped-def]
    auditor = make_person("auditor")
    _append(7, actor="user:alice")
    _append(3, actor="user:bob")
    r = client.get("/api/v1/audit/events?actor=user:alice&limit=5", headers=auditor.headers)
    page = r.get_json()
    assert r.status_code == 200 and len(page["events"]) == 5
    assert {e["actor"] for e in page["events"]} == {"user:alice"}
    r = client.get(f"/api/v1/audit/events?actor=user:alice&after_seq={page['next_after_seq']}",
                   headers=auditor.headers)
    rest = r.get_json()
    assert len(rest["events"]) == 2 and rest["next_after_seq"] is None
    r = client.get("/api/v1/audit/events?since=2000-01-01T00:00:00", headers=auditor.headers)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "validation_failed"
    r = client.get("/api/v1/audit/events?colour=red", headers=auditor.headers)
    assert r.get_json()["error"]["details"]["errors"][0]["field"] == "colour"
    r = client.post("/api/v1/audit/verify", headers=auditor.headers)
    assert r.get_json()["ok"] is True and r.get_json()["count"] >= 10
