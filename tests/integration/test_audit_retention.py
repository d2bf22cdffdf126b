"""Retention: old dispatch events are purged only behind a signed checkpoint, leave
tombstones, and the chain, the tree, new checkpoints and exports all still verify."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from charter.audit import checkpoints
from charter.audit.bundle import Selection
from charter.audit.retention import purge
from charter.audit.service import (
    EventFilter,
    export_bundle,
    list_events,
    verify_chain,
)
from charter.audit.verify import leaf_hash, verify, verify_bundle, verify_inclusion
from charter.db import utcnow
from charter.uow import record, unit_of_work
from tests.audit_support import append_many, signing


def test_purge_keeps_what_verification_needs(configured, pg_conn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = signing(configured, tmp_path)
    later = utcnow() + timedelta(days=s.audit_retention_days + 1)
    append_many(300)  # dispatch.outcome events
    with unit_of_work() as session:
        record(session, actor="user:ann", action="version.approve", target_type="version",
               target_id="v1", details={"conditions": {}})
    append_many(20, start=300)
    assert purge(s, now=later).events == 0  # nothing is behind a checkpoint yet
    cp = checkpoints.issue(s, force=True)
    assert cp is not None and cp.size == 321
    append_many(5, start=320)  # after the checkpoint: kept whatever their age
    assert purge(s, now=utcnow()).events == 0  # nothing is old enough
    done = purge(s, now=later, batch=128)
    assert (done.events, done.first_seq, done.last_seq, done.checkpoint_size) == (
        320, 1, 321, 321)
    left = list_events(EventFilter(limit=1000))
    assert [e.seq for e in left if e.seq <= 321] == [301]  # the approval stays
    purges = [e for e in left if e.action == "audit.purge"]
    assert [p.details["events"] for p in purges] == [128, 128, 64]
    assert all(p.actor == "system:retention" and p.details["checkpoint_size"] == 321
               for p in purges)
    assert verify_chain().ok and verify_chain().count == 321 + 5 + 3

    # The tree still proves a purged event (by its tombstone) and signs new checkpoints.
    again = checkpoints.issue(s, force=True)
    assert again is not None and again.size == 329
    key = checkpoints.load_signers(s)[0].verifier
    signed, event_hash, path = checkpoints.inclusion(42)
    verify_inclusion(leaf_hash(bytes.fromhex(event_hash)), 41, signed.size, path,
                     verify(signed.note, [key]).root_hash)
    out = io.BytesIO()
    export_bundle(s, Selection(), out, actor_ref="user:auditor")
    report = verify_bundle(out.getvalue(), [key])
    assert report.ok and report.events == 1 + 5 + 3 + 1 - 1  # approval, 5 new, 3 purges

    # Deleting without a tombstone stays refused, and tombstones are append-only.
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="tombstone"):
        pg_conn.execute("DELETE FROM audit_events WHERE seq = 301")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        pg_conn.execute("UPDATE audit_purged SET hash = 'x' WHERE seq = 1")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        pg_conn.execute("DELETE FROM audit_purged WHERE seq = 1")


def test_a_tombstone_changed_by_hand_breaks_the_chain(configured, pg_conn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = signing(configured, tmp_path)
    append_many(10)
    checkpoints.issue(s, force=True)
    purge(s, now=utcnow() + timedelta(days=400))
    pg_conn.execute("ALTER TABLE audit_purged DISABLE TRIGGER USER")
    pg_conn.execute("UPDATE audit_purged SET hash = repeat('a', 64) WHERE seq = 4")
    verdict = verify_chain()
    assert not verdict.ok and verdict.first_bad_seq == 4
    with pytest.raises(checkpoints.AuditIntegrityError):
        append_many(1, start=99)
        checkpoints.issue(s, force=True)


def test_the_embedded_database_checkpoints_purges_and_exports_alike(tmp_path: Path) -> None:
    """SQLite (the demo): the same tree, tombstones, triggers and bundles."""
    import sqlite3

    from charter import migrate
    from charter.settings import Settings
    from tests.runtimes import bind_runtime, release_runtime

    url = f"sqlite:///{tmp_path / 'e.db'}"
    migrate.upgrade(url)
    s = signing(Settings.from_env({}, database_url=url, secret_key="s" * 40), tmp_path)
    bind_runtime(s)
    try:
        append_many(600)
        checkpoints.issue(s, force=True)
        append_many(3, start=600)
        assert purge(s, now=utcnow() + timedelta(days=400)).events == 600
        assert checkpoints.issue(s, force=True).size == 604  # type: ignore[union-attr]
        assert verify_chain().ok
        out = io.BytesIO()
        export_bundle(s, Selection(), out, actor_ref="user:auditor")
        key = checkpoints.load_signers(s)[0].verifier
        report = verify_bundle(out.getvalue(), [key])
        assert report.ok and report.events == 4
        with sqlite3.connect(tmp_path / "e.db") as raw:
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                raw.execute("DELETE FROM audit_events WHERE seq = 601")
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                raw.execute("DELETE FROM audit_purged WHERE seq = 1")
    finally:
        release_runtime()
