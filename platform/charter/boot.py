"""build_runtime(settings): the one place where a Charter process's parts are made.

The composition root: it alone knows every part's maker. The app factory, `charter
worker` and `charter beat`, the CLI's commands, the demo and the tests call it once and
hand the Runtime on (charter.runtime).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from charter.audit.chain import canonical_json
from charter.audit.journal import JOURNAL
from charter.audit.seal import Sealer
from charter.audit.writer import Entry, GroupWriter, make_writer
from charter.batches.slots import Slots, make_slots
from charter.db import Database
from charter.dispatch.balance import Outstanding
from charter.identity.authn import Authenticator
from charter.metering.limits import MemoryStore, RedisStore
from charter.nodes.client import NodePool
from charter.nodes.service import url_policy
from charter.policy.service import build_policies
from charter.readcache import ReadCache
from charter.runtime import Runtime
from charter.settings import Settings
from charter.tasks import TaskQueue
from charter.tracing import Tracing


def build_runtime(settings: Settings) -> Runtime:
    """Every part, from the settings; a part that cannot be made (a broken policy, a bad
    OPA URL, SSO settings without an issuer) fails here, at start-up."""
    # JSON columns are written as RFC 8785 text: an audit event's details are stored as the
    # bytes its hash covers, so the database walk checks them without re-encoding.
    database = Database.from_settings(settings,
                                      json_serializer=lambda v: canonical_json(v).decode())
    made: list[object] = [database]
    try:
        policies = build_policies(settings)
        sealer = Sealer(settings.audit_seal_key) if settings.audit_seal_key else None
        authenticator = Authenticator(settings)
        tasks = TaskQueue(settings)
        made.append(tasks)
    except BaseException:
        for part in reversed(made):
            _close(part)
        raise
    metrics = _registry()
    dropped = Counter("charter_audit_events_dropped_total",
                      "Deferred audit entries (dispatch outcomes) given up on, by reason: an "
                      "alarm, never expected", ["reason"], registry=metrics)

    commits = Histogram("charter_audit_commit_seconds", "The group writer's transactions: "
                        "chain lock, append, counters, commit", registry=metrics,
                        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                 0.5, 1.0, 2.5))
    sizes = Histogram("charter_audit_commit_entries", "Entries (decisions, outcomes) a "
                      "transaction wrote together", registry=metrics,
                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))

    def writer(rt: Runtime) -> GroupWriter:
        def on_drop(_entry: Entry, reason: str) -> None:
            dropped.labels(reason).inc()

        def on_commit(seconds: float, entries: int) -> None:
            commits.observe(seconds)
            sizes.observe(entries)

        return make_writer(rt.database, linger_s=settings.audit_outcome_linger_s,
                           on_drop=on_drop, on_commit=on_commit)

    def slots(rt: Runtime) -> Slots:
        return make_slots(rt.database)

    runtime = Runtime(
        settings, database=database, policies=policies, tasks=tasks, readcache=ReadCache(),
        node_pool=NodePool(connect_timeout=settings.node_connect_timeout_s,
                           read_timeout=settings.node_read_timeout_s),
        node_urls=url_policy(settings), outstanding=Outstanding(),
        authenticator=authenticator, metrics=metrics, journal=JOURNAL, sealer=sealer,
        limits=(RedisStore(settings.limits_redis_url, timeout_s=settings.limits_timeout_s)
                if settings.limits_redis_url else MemoryStore()),
        tracing=Tracing(settings), make_writer=writer, make_slots=slots)
    tasks.attach(runtime)
    if isinstance(runtime.limits, RedisStore):  # charges dropped while Redis was away
        from charter.dispatch.service import count_unavailable

        runtime.limits.on_uncharged = lambda n: count_unavailable("uncharged", n, runtime)
    return runtime


def _registry() -> CollectorRegistry:
    """The Runtime's metrics: its own registry, with the process's standard collectors."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _close(part: object) -> None:
    close = getattr(part, "close", None) or getattr(part, "dispose", None)
    if close is not None:
        close()
