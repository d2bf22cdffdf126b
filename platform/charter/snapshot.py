"""A per-process read cache that the database itself invalidates.

Triggers (migration 0005) add one to `change_generation.value` in the same transaction as
any change to users, roles, keys, teams, members, models, versions, approvals, nodes or
deployments. A request reads that number once; cached entries belong to one generation,
so after any committed change every process reloads on its next request. The gateway's
dispatch routes skip the read: they decide on `SNAPSHOT.latest`, and the audit writer
commits the decision only if that generation is still current (charter.audit.writer).
Nothing is ever served from a generation older than the one the request read, which
makes the cache as fresh as reading the tables themselves at that moment, without a TTL.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import text

from charter.db import unit_of_work

T = TypeVar("T")
generation_var: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "charter_generation", default=None)


def read_generation() -> int:
    with unit_of_work() as session:
        return int(session.execute(
            text("SELECT value FROM change_generation WHERE id = 1")).scalar_one())


class Snapshot:
    def __init__(self, max_entries: int = 50_000) -> None:
        self.max_entries = max_entries
        self._generation: int | None = None
        self._entries: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget everything (another database was configured: its generations differ)."""
        with self._lock:
            self._entries.clear()
            self._generation = None

    @property
    def latest(self) -> int | None:
        """The newest generation this process has cached entries for (None: none yet)."""
        return self._generation

    def cached(self, key: Any, loader: Callable[[], T]) -> T:
        """`loader()` once per generation; without a request's generation, always."""
        generation = generation_var.get()
        if generation is None:
            return loader()
        with self._lock:
            if generation != self._generation:
                if self._generation is not None and generation < self._generation:
                    return loader()  # a request that read before a newer one: no caching
                self._entries.clear()
                self._generation = generation
            if key in self._entries:
                return self._entries[key]  # type: ignore[no-any-return]
        value = loader()
        with self._lock:
            if generation == self._generation and len(self._entries) < self.max_entries:
                self._entries[key] = value
        return value


SNAPSHOT = Snapshot()
