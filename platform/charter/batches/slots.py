"""Batch slots per node, and named locks (a batch's lanes), held across workers.

Slots: how many batch lines may be on one node at once.

A node's slots are `max(1, floor(capacity * batch_node_share))`; online requests never take
one, so batches cannot fill a node that callers are waiting on. On PostgreSQL a slot is a
session advisory lock on a connection of the holding thread's own: it is freed by
PostgreSQL itself when the worker dies (the connection drops), so a SIGKILL never leaks
one. A named lock works the same way. On SQLite (the embedded demo: one process) both
are counts in this process.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import structlog
from sqlalchemy.engine import make_url

from charter import scope
from charter.db import Database
from charter.nodes.service import NodeTarget

log = structlog.get_logger("charter.batches")
_NAMESPACE = 0x42415443  # "BATC": the first key of every slot lock
_NAMED = 0x4C414E45  # "LANE": the first key of named locks (a batch's lanes)


def slot_count(capacity: int, share: float) -> int:
    return max(1, int(capacity * share))


def _slot_key(node_id: str, slot: int) -> int:
    return (zlib.crc32(node_id.encode()) & 0x00FFFFFF) * 64 + slot


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


class _PostgresSlots:
    def __init__(self, url: str) -> None:
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        self._local = threading.local()
        self._all: list[psycopg.Connection[Any]] = []  # every thread's, for close()
        self._all_lock = threading.Lock()

    def _conn(self) -> psycopg.Connection[Any]:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=5)
            self._local.conn = conn
            self._local.lock_timeout = None
            with self._all_lock:
                self._all = [c for c in self._all if not c.closed]
                self._all.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection: PostgreSQL frees the locks they held."""
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except psycopg.Error:
                log.warning("slot connection did not close cleanly")

    def try_take(self, node_id: str, slots: int, first: int = 0) -> int | None:
        order = [(first + i) % slots for i in range(slots)]  # its own slot first
        got = self._conn().execute(
            "SELECT charter_take_slot(%s, %s)",
            (_NAMESPACE, [_slot_key(node_id, slot) for slot in order])).fetchone()
        if not got or got[0] is None:
            return None
        return order[[_slot_key(node_id, slot) for slot in order].index(got[0])]

    def take_waiting(self, node_id: str, slot: int, wait_s: float) -> bool:
        conn = self._conn()
        timeout = f"{max(1, int(wait_s * 1000))}ms"
        if getattr(self._local, "lock_timeout", None) != timeout:
            conn.execute(f"SET lock_timeout = '{timeout}'")  # only advisory locks wait
            self._local.lock_timeout = timeout
        try:
            conn.execute("SELECT pg_advisory_lock(%s, %s)",
                         (_NAMESPACE, _slot_key(node_id, slot)))
        except psycopg.errors.LockNotAvailable:
            return False
        return True

    def give_back(self, node_id: str, slot: int) -> None:
        self._unlock(_NAMESPACE, _slot_key(node_id, slot))

    def try_lock(self, name: str) -> bool:
        got = self._conn().execute("SELECT pg_try_advisory_lock(%s, %s)",
                                   (_NAMED, _name_key(name))).fetchone()
        return bool(got and got[0])

    def unlock(self, name: str) -> None:
        self._unlock(_NAMED, _name_key(name))

    def _unlock(self, k1: int, k2: int) -> None:
        try:
            self._conn().execute("SELECT pg_advisory_unlock(%s, %s)", (k1, k2))
        except psycopg.Error as exc:  # the connection is gone, and its locks with it
            log.warning("lock connection lost", error=repr(exc))


class _LocalSlots:
    def close(self) -> None:
        """Nothing to let go of: the counts live in this process."""

    def __init__(self) -> None:
        self._held: dict[str, set[int]] = defaultdict(set)
        self._names: set[str] = set()
        self._lock = threading.RLock()
        self._freed = threading.Condition(self._lock)

    def try_take(self, node_id: str, slots: int, first: int = 0) -> int | None:
        with self._lock:
            held = self._held[node_id]
            for slot in ((first + i) % slots for i in range(slots)):
                if slot not in held:
                    held.add(slot)
                    return slot
        return None

    def take_waiting(self, node_id: str, slot: int, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        with self._freed:
            while slot in self._held[node_id]:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._freed.wait(left)
            self._held[node_id].add(slot)
            return True

    def give_back(self, node_id: str, slot: int) -> None:
        with self._freed:
            self._held[node_id].discard(slot)
            self._freed.notify_all()

    def try_lock(self, name: str) -> bool:
        with self._lock:
            if name in self._names:
                return False
            self._names.add(name)
            return True

    def unlock(self, name: str) -> None:
        with self._lock:
            self._names.discard(name)


Slots = _PostgresSlots | _LocalSlots


def make_slots(database: Database) -> Slots:
    """A Runtime's slots (charter.runtime.Runtime.slots): advisory locks on PostgreSQL,
    counts in this process on SQLite."""
    if database.dialect == "postgresql":
        return _PostgresSlots(database.url)
    return _LocalSlots()


def _impl() -> Slots:
    return scope.current().slots


def pg_connection() -> psycopg.Connection[Any] | None:
    """This thread's own autocommit connection on PostgreSQL (None on SQLite): the one
    its slots and locks live on, also used for the lanes' one-statement claims."""
    impl = _impl()
    return impl._conn() if isinstance(impl, _PostgresSlots) else None


@contextmanager
def node_slot(nodes: Sequence[NodeTarget], capacities: dict[str, int], share: float,
              wait_s: float, prefer: int = 0) -> Iterator[NodeTarget | None]:
    """Hold a batch slot on the first of `nodes` (in order) with one free; if none is,
    wait (in the database's lock queue: handed over the moment it is released) for slot
    `prefer` of the first node. None if it did not free up within `wait_s`. Released when
    the block ends. A batch's lanes prefer slots in turn, so they spread evenly."""
    impl = _impl()
    taken: tuple[NodeTarget, int] | None = None
    for node in nodes:
        count = slot_count(capacities.get(node.id, 1), share)
        slot = impl.try_take(node.id, count, prefer % count)
        if slot is not None:
            taken = (node, slot)
            break
    if taken is None and nodes:
        slot = prefer % slot_count(capacities.get(nodes[0].id, 1), share)
        if impl.take_waiting(nodes[0].id, slot, wait_s):
            taken = (nodes[0], slot)
    try:
        yield taken[0] if taken else None
    finally:
        if taken is not None:
            impl.give_back(taken[0].id, taken[1])


@contextmanager
def named_lock(name: str) -> Iterator[bool]:
    """Hold the lock `name` for the block if nobody holds it (yields whether it is held)."""
    impl = _impl()
    held = impl.try_lock(name)
    try:
        yield held
    finally:
        if held:
            impl.unlock(name)


def lock_is_free(name: str) -> bool:
    """Whether nobody holds `name` right now (a lane whose worker died holds nothing)."""
    impl = _impl()
    if not impl.try_lock(name):
        return False
    impl.unlock(name)
    return True
