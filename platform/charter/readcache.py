"""A per-process read cache that the database itself invalidates: the whole freshness rule.

Triggers (migrations 0005, 0006) add one to `change_generation.value` in the same
transaction as any change to users, roles, keys, teams, members, models, versions,
approvals, nodes or deployments (not to `api_keys.last_used_at`). Cached entries belong to
one generation, so after any committed change every process reloads on its next request.
Two ways to use it:

- Pessimistic (every API route): read the generation once per request (`current()`), and
  read through the cache of that generation. Nothing is served from a generation older
  than the one the request read, which makes the cache as fresh as the tables themselves.
- Optimistic (the gateway's dispatch routes): decide on the newest generation this process
  knows (`latest`), and commit the decision only if that generation is still current under
  the audit chain's lock (the group writer: charter.audit.writer, and in PostgreSQL the
  function charter_audit_append of migration 0010). If it moved, the commit refuses the
  entry as stale: `StaleReadError` carries the new generation, and the caller
  authenticates and decides again on it. Either way a decision is valid as of its place
  in the chain.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.orm import Session

from charter.uow import unit_of_work

T = TypeVar("T")
GENERATION_SQL = "SELECT value FROM change_generation WHERE id = 1"


class StaleReadError(Exception):
    """What a request was decided on changed before its decision was committed."""

    def __init__(self, generation: int) -> None:
        super().__init__(f"the read cache moved to generation {generation}")
        self.generation = generation


def read_generation(session: Session) -> int:
    """The current generation, read in `session`'s transaction."""
    return int(session.execute(text(GENERATION_SQL)).scalar_one())


def current_generation() -> int:
    """The current generation, in a unit of work of its own."""
    with unit_of_work() as session:
        return read_generation(session)


def still_current(decided_on: int | None, current: int) -> bool:
    """Whether content decided on `decided_on` may be committed when the database is at
    `current` (None: nothing was read through the cache)."""
    return decided_on is None or decided_on == current


class ReadCache:
    def __init__(self, max_entries: int = 50_000) -> None:
        self.max_entries = max_entries
        self._generation: int | None = None
        self._entries: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._generation = None

    @property
    def latest(self) -> int | None:
        """The newest generation this process has cached entries for (None: none yet)."""
        return self._generation

    def cached(self, generation: int | None, key: Any, loader: Callable[[], T]) -> T:
        """`loader()` once per generation; without a generation (None), always."""
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
