"""Helpers for the audit evidence tests: signing keys, many events at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from charter.audit.checkpoints import generate_key
from charter.settings import Settings
from charter.uow import record, unit_of_work

ORIGIN = "charter.test/audit"


def signing(settings: Settings, folder: Path, *names: str, **extra: Any) -> Settings:
    """Settings that sign checkpoints with new keys made in `folder`."""
    paths = []
    for name in names or ("primary",):
        path = folder / f"{name}.pem"
        if not path.exists():
            generate_key(path)
        paths.append(str(path))
    return dataclasses.replace(settings, audit_log_origin=ORIGIN,
                               audit_signing_keys=",".join(paths), **extra)


def append_many(n: int, *, start: int = 0, actor: str = "user:alice",
                team: str = "analytics", action: str = "dispatch.outcome") -> None:
    """`n` events in one transaction (one commit), with a little variety."""
    with unit_of_work() as session:
        for i in range(start, start + n):
            record(session, actor=actor if i % 3 else "user:bob", action=action,
                   target_type="deployment", target_id=f"chat-{i % 4}",
                   details={"i": i, "team": team if i % 2 else "support",
                                  "tokens_out": i % 50, "note": "é \u2028 <x>"})


# --- what a database insider does (PostgreSQL superuser, triggers bypassed) ----------------

def as_insider(pg_conn: Any, *statements: str, params: tuple[Any, ...] = ()) -> None:
    """Run statements with the append-only triggers bypassed, as a superuser can."""
    pg_conn.execute("SET session_replication_role = replica")
    try:
        for statement in statements:
            pg_conn.execute(statement, params or None)
    finally:
        pg_conn.execute("SET session_replication_role = DEFAULT")


def rechain(pg_conn: Any, start: int) -> None:
    """Recompute every hash and link from event `start` on, as someone who knows the
    algorithm would after editing a row: the chain verifies again."""
    from charter.audit.chain import GENESIS_HASH, event_body, event_hash

    rows = pg_conn.execute(
        "SELECT seq, ts, actor, action, target_type, target_id, outcome, details, "
        "request_id FROM audit_events WHERE seq >= %s ORDER BY seq", (start,)).fetchall()
    prev = pg_conn.execute("SELECT hash FROM audit_events WHERE seq = %s",
                           (start - 1,)).fetchone()
    prev_hash = prev[0] if prev else GENESIS_HASH
    pg_conn.execute("SET session_replication_role = replica")
    try:
        for seq, ts, actor, action, target_type, target_id, outcome, details, rid in rows:
            digest = event_hash(event_body(
                seq=seq, ts=ts, actor=actor, action=action, target_type=target_type,
                target_id=target_id, outcome=outcome, details=details, request_id=rid,
                prev_hash=prev_hash))
            pg_conn.execute("UPDATE audit_events SET prev_hash = %s, hash = %s WHERE seq = %s",
                            (prev_hash, digest, seq))
            prev_hash = digest
    finally:
        pg_conn.execute("SET session_replication_role = DEFAULT")
