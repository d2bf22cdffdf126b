"""Runtime: the parts of one Charter process, built once from Settings.

`charter.boot.build_runtime(settings)` makes one: the database, the policy engine and its
verdict cache, the task queue, the node pool and URL policy, the read cache, the
authenticator, the metrics registry, and (on first use) the audit writer and the batch
slots. The app factory, the Celery worker, the CLI and the tests take a Runtime; an entry
point binds it (charter.scope) while it works. Nothing else in Charter keeps mutable state
at module level, so two runtimes in one process never meet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog
from prometheus_client import Counter, Histogram
from sqlalchemy.orm import Session

from charter.settings import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from charter.audit.seal import Sealer
    from charter.audit.writer import GroupWriter
    from charter.batches.slots import Slots
    from charter.db import Database
    from charter.dispatch.balance import Outstanding
    from charter.identity.authn import Authenticator
    from charter.metering.limits import Store
    from charter.nodes.client import NodePool
    from charter.nodes.ssrf import NodeUrlPolicy
    from charter.policy.service import Policies
    from charter.readcache import ReadCache
    from charter.tasks import TaskQueue
    from charter.tracing import Tracing

T = TypeVar("T")
log = structlog.get_logger("charter.runtime")


class Journal(Protocol):
    """The audit log's write side, as core's unit of work uses it (charter.uow): made by
    the audit domain (charter.audit.journal.JOURNAL) and handed over by charter.boot."""

    def event(self, *, actor: str, action: str, target_type: str, target_id: str,
              outcome: str = "success", details: dict[str, Any] | None = None) -> Any: ...

    def append(self, session: Session, event: Any) -> tuple[int, str]: ...


class Runtime:
    def __init__(self, settings: Settings, *, database: Database, policies: Policies,
                 tasks: TaskQueue, readcache: ReadCache, node_pool: NodePool,
                 node_urls: NodeUrlPolicy, outstanding: Outstanding,
                 authenticator: Authenticator, metrics: CollectorRegistry, journal: Journal,
                 limits: Store, tracing: Tracing, sealer: Sealer | None = None,
                 make_writer: Callable[[Runtime], GroupWriter],
                 make_slots: Callable[[Runtime], Slots]) -> None:
        self.settings = settings
        self.database = database
        self.policies = policies
        self.tasks = tasks
        self.readcache = readcache
        self.node_pool = node_pool
        self.node_urls = node_urls
        self.outstanding = outstanding
        self.authenticator = authenticator
        self.metrics = metrics
        self.journal = journal
        self.sealer = sealer  # seals every event as it is made (charter.audit.seal)
        self.limits = limits  # per-team and per-key limits' state (charter.metering.limits)
        self.tracing = tracing  # spans of requests, off by default (charter.tracing)
        self.limits_unavailable_said = 0.0  # when limits.unavailable was last audited
        self._make_writer = make_writer
        self._make_slots = make_slots
        self._lazy: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._closed = False

    def part(self, name: str, make: Callable[[Runtime], T]) -> T:
        """A part of this runtime made on first use and kept until it closes: the audit
        writer, the slots, metrics, and a domain's own (the tokenizers of
        charter.dispatch.service), which core makes without knowing them."""
        found = self._lazy.get(name)
        if found is None:
            with self._lock:
                found = self._lazy.get(name)
                if found is None:
                    if self._closed:
                        raise RuntimeError("this Charter runtime is closed")
                    found = self._lazy[name] = make(self)
        return found

    @property
    def writer(self) -> GroupWriter:
        """The gateway's group-commit audit writer, made on first use."""
        return self.part("writer", self._make_writer)

    @property
    def slots(self) -> Slots:
        """Batch slots and named locks (PostgreSQL advisory locks, or in-process)."""
        return self.part("slots", self._make_slots)

    def counter(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
        """A counter in this Runtime's metrics registry, made on first use."""
        return self.part(f"counter:{name}", lambda rt: Counter(
            name.removesuffix("_total"), documentation, labels, registry=rt.metrics))

    def histogram(self, name: str, documentation: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                1.0, 2.5, 5.0, 10.0, 30.0, 60.0)) -> Histogram:
        """A histogram in this Runtime's metrics registry, made on first use."""
        return self.part(f"histogram:{name}", lambda rt: Histogram(
            name, documentation, labels, registry=rt.metrics, buckets=buckets))

    def flush(self) -> None:
        """Write the audit events and the limits' charges still queued (gunicorn's
        worker_exit, a clean stop)."""
        writer = self._lazy.get("writer")
        if writer is not None:
            writer.flush()
        self._flush_limits()

    def _flush_limits(self) -> None:
        try:
            self.limits.flush()
        except Exception as exc:  # noqa: BLE001 - Redis away: counted when dropped
            log.warning("limits: charges not sent on the way out", error=str(exc))

    def close(self) -> None:
        """Write what is queued, then let go of every connection, pool and thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            parts, self._lazy = self._lazy, {}
        writer = parts.get("writer")
        if writer is not None:
            writer.close()  # writes what is still queued
        self._flush_limits()
        self.limits.close()
        slots = parts.get("slots")
        if slots is not None:
            slots.close()
        self.tasks.close()
        self.tracing.close()
        self.node_pool.close()
        self.database.dispose()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
