"""Helpers for the audit evidence tests: signing keys, many events at once."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import Iterator
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


def insider_row(pg_conn: Any, seq: int) -> dict[str, Any]:
    """Event `seq` as its row, read straight from the table."""
    cur = pg_conn.execute("SELECT * FROM audit_events WHERE seq = %s", (seq,))
    return dict(zip([c.name for c in cur.description], cur.fetchone(), strict=True))


_SAME: Any = object()


def append_forged(pg_conn: Any, *, seal: Any = _SAME, details: dict[str, Any] | None = None,
                  id_tail: str = "f") -> int:
    """The issue's attack: append a forged `version.approve` after the last event with a
    correct chain hash, an id of the last event's clock, and `seal` (by default the last
    event's, copied). Returns its seq."""
    from charter.audit.chain import event_body, event_hash

    last = pg_conn.execute("SELECT max(seq) FROM audit_events").fetchone()[0]
    head = insider_row(pg_conn, last)
    forged = {"seq": last + 1, "ts": head["ts"], "actor": "user:mallory",
              "action": "version.approve", "target_type": "model_version",
              "target_id": "v-evil", "outcome": "success", "details": details or {},
              "request_id": None, "prev_hash": head["hash"]}
    as_insider(pg_conn, "INSERT INTO audit_events (seq, ts, actor, action, target_type, "
                        "target_id, outcome, details, request_id, prev_hash, hash, event_id, "
                        "seal) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, NULL, %s, %s, %s, %s)",
               params=(last + 1, forged["ts"], forged["actor"], forged["action"],
                       forged["target_type"], forged["target_id"], forged["outcome"],
                       json.dumps(forged["details"]), forged["prev_hash"],
                       event_hash(event_body(**forged)), head["event_id"][:12] + id_tail * 20,
                       head["seal"] if seal is _SAME else seal))
    return last + 1  # type: ignore[no-any-return]


@contextlib.contextmanager
def role_without_audit_insert(pg_conn: Any, database_url: str) -> Iterator[tuple[str, str]]:
    """A login role with the app's rights but INSERT on audit_events (as an administrator
    might leave it by mistake, or an attacker to act unrecorded): (role, its database URL).
    Dropped on exit, with what it owns."""
    from sqlalchemy.engine import make_url

    role = f"charter_app_{uuid.uuid4().hex[:8]}"
    pg_conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        pg_conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        pg_conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public "
                        f"TO {role}")
        pg_conn.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}")
        pg_conn.execute(f"REVOKE INSERT ON audit_events FROM {role}")
        url = make_url(database_url).set(username=role)
        yield role, url.render_as_string(hide_password=False)
    finally:
        pg_conn.execute(f"DROP OWNED BY {role}")
        pg_conn.execute(f"DROP ROLE {role}")
