"""The witness's state: per log, the latest checkpoint it cosigned; and the evidence of
refused checkpoints. A SQLite file on the witness's own storage.

Checking a submission's old size against the stored one and storing the new checkpoint
is one `BEGIN IMMEDIATE` transaction (a write lock taken before the read), so two
submissions, from threads or processes alike, can never roll the state back (the race
tlog-witness warns of). Every commit is synchronous: a cosignature is only returned once
its checkpoint is on disk.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (
    origin TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    note TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS evidence (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    origin TEXT NOT NULL,
    received_at TEXT NOT NULL,
    reason TEXT NOT NULL,
    request BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class Latest:
    size: int
    root: bytes
    note: str


class WitnessState:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()

    def latest(self, origin: str) -> Latest | None:
        with self._connect() as conn:
            row = conn.execute("SELECT size, root, note FROM logs WHERE origin = ?",
                               (origin,)).fetchone()
        return Latest(int(row[0]), bytes(row[1]), row[2]) if row else None

    def advance(self, origin: str, size: int, root: bytes, note: str,
                check: Callable[[Latest | None], None]) -> None:
        """Store the new latest checkpoint if `check(stored)` does not raise; both under
        one write lock."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT size, root, note FROM logs WHERE origin = ?",
                                   (origin,)).fetchone()
                check(Latest(int(row[0]), bytes(row[1]), row[2]) if row else None)
                conn.execute(
                    "INSERT INTO logs (origin, size, root, note, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (origin) DO UPDATE SET "
                    "size = excluded.size, root = excluded.root, note = excluded.note, "
                    "updated_at = excluded.updated_at",
                    (origin, size, root, note, _now()))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def keep_evidence(self, origin: str, reason: str, request: bytes) -> None:
        """A log-signed checkpoint the witness refused: proof of the log's misbehaviour."""
        with self._connect() as conn:
            conn.execute("INSERT INTO evidence (origin, received_at, reason, request) "
                         "VALUES (?, ?, ?, ?)", (origin, _now(), reason, request))

    def evidence(self, origin: str) -> list[tuple[str, str, bytes]]:
        with self._connect() as conn:
            return [(r[0], r[1], bytes(r[2])) for r in conn.execute(
                "SELECT received_at, reason, request FROM evidence WHERE origin = ? "
                "ORDER BY id", (origin,))]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
