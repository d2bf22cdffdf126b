"""Background tasks: one set of thin tasks, run by Celery in production or in-process.

Every task takes ids and makes one service call; the state it works on is in the database,
so a task may run twice, late, or never (a lost message) without harm: the batch sweep
sends again what nobody took. With `task_backend=celery` the tasks go through the broker
(Redis, or RabbitMQ) to `charter worker` processes, and `charter beat` sends the periodic
ones; with `inprocess` (the embedded default) a thread pool runs them and a scheduler
thread in the serving process sends the periodic ones. Each Runtime has its own TaskQueue
(and its own Celery app); a task runs with its Runtime bound (charter.scope).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import structlog
from celery import Celery

from charter import scope
from charter.audit import checkpoints, retention, ship
from charter.audit.service import scheduled_walk
from charter.batches import files, lanes
from charter.batches import service as batches
from charter.identity.reconcile import reconcile
from charter.inspection import captures, counts
from charter.nodes.service import probe_round
from charter.registry.service import expire_approvals
from charter.settings import Settings

if TYPE_CHECKING:
    from charter.runtime import Runtime

log = structlog.get_logger("charter.tasks")


def _configure_celery(celery: Celery, s: Settings) -> None:
    celery.conf.update(
        broker_url=s.broker_url,
        task_default_queue=s.task_queue,
        task_acks_late=True,  # a task is acknowledged when done, not when taken
        task_reject_on_worker_lost=True,  # ... and given back when its worker dies
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_transport_options={"visibility_timeout": s.task_visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        # Sending fails fast while the broker is away: the sweep sends again later.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0,
                                   "interval_step": 0.2, "interval_max": 0.5},
        worker_hijack_root_logger=False,
        timezone="UTC",
        beat_schedule={name: {"task": name, "schedule": every, "options": {"expires": every}}
                       for name, every in schedule(s).items()},
    )


def schedule(s: Settings) -> dict[str, float]:
    """The periodic tasks and their intervals in seconds."""
    periodic = {"charter.nodes.probe": s.node_probe_interval_s,
                "charter.batches.sweep": s.batch_sweep_interval_s,
                "charter.maintenance": s.maintenance_interval_s}
    if s.signing_key_paths:
        periodic["charter.audit.checkpoint"] = s.audit_checkpoint_poll_s
    if s.audit_walk_interval_s > 0:
        periodic["charter.audit.walk"] = s.audit_walk_interval_s
    if s.audit_siem_syslog or s.audit_siem_otlp:
        periodic["charter.audit.ship"] = s.audit_siem_interval_s
    if s.directory_file:
        periodic["charter.identity.reconcile"] = s.directory_interval_s
    return periodic


# --- the tasks: each takes ids and makes one service call ----------------------------------

def _start_batch(rt: Runtime, batch_id: str) -> None:
    batches.start_batch(batch_id)


def _run_lane(rt: Runtime, batch_id: str, lane: int) -> None:
    lanes.run_lane(batch_id, lane, rt.settings)


def _sweep(rt: Runtime) -> None:
    batches.sweep(rt.settings)


def _probe(rt: Runtime) -> None:
    probe_round(rt.settings)


def _maintenance(rt: Runtime) -> None:
    expire_approvals()
    files.purge_expired_files(rt.settings)
    retention.purge(rt.settings)
    counts.rollup()
    captures.purge_due()


def _reconcile(rt: Runtime) -> None:
    reconcile(rt.settings.directory_file, max_removals=rt.settings.directory_max_removals)


def _checkpoint(rt: Runtime) -> None:
    checkpoints.issue(rt.settings)


def _walk(rt: Runtime) -> None:
    scheduled_walk()


def _ship(rt: Runtime) -> None:
    ship.ship(rt.settings)


TASKS: dict[str, Callable[..., None]] = {
    "charter.audit.checkpoint": _checkpoint,
    "charter.audit.walk": _walk,
    "charter.audit.ship": _ship,
    "charter.batches.start": _start_batch,
    "charter.batches.lane": _run_lane,
    "charter.batches.sweep": _sweep,
    "charter.nodes.probe": _probe,
    "charter.maintenance": _maintenance,
    "charter.identity.reconcile": _reconcile,
}


class TaskQueue:
    """Where a Runtime's tasks go: its Celery app (task_backend `celery`) or its thread
    pool (`inprocess`). Tasks run with the Runtime they were attached to bound."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery = Celery("charter", set_as_current=False)
        self._runtime: Runtime | None = None
        self._pool: ThreadPoolExecutor | None = None
        if settings.task_backend == "celery":
            _configure_celery(self.celery, settings)
        else:
            self._pool = ThreadPoolExecutor(settings.task_inprocess_threads,
                                            thread_name_prefix="charter-task")
        for name in TASKS:
            self.celery.task(name=name, acks_late=True, ignore_result=True)(
                self._celery_task(name))

    def attach(self, runtime: Runtime) -> None:
        """The Runtime that tasks run with (set once, by charter.boot)."""
        self._runtime = runtime

    def _celery_task(self, name: str) -> Callable[..., None]:
        def run(*args: Any) -> None:
            self.run(name, *args)

        run.__name__ = name.replace(".", "_")
        return run

    def run(self, name: str, *args: Any) -> None:
        """Run a task here and now, with this queue's Runtime bound."""
        runtime = self._runtime
        if runtime is None:
            raise RuntimeError("this task queue has no runtime attached")
        with scope.bound(runtime):
            TASKS[name](runtime, *args)

    def send(self, name: str, *args: Any) -> bool:
        """Queue a task; False (logged) if it could not be queued: the sweep will resend."""
        if self._pool is None:
            try:
                self.celery.send_task(name, args=args, queue=self.settings.task_queue)
            except Exception as exc:  # noqa: BLE001 - the broker is away; the state is safe
                log.warning("task not queued", task=name, error=repr(exc))
                return False
            return True
        try:
            self._pool.submit(self._run_inprocess, name, args)
        except RuntimeError:  # the pool is shut down: this runtime is closing
            log.warning("task not queued: the runtime is closing", task=name)
            return False
        return True

    def _run_inprocess(self, name: str, args: tuple[Any, ...]) -> None:
        try:
            self.run(name, *args)
        except Exception as exc:  # noqa: BLE001 - a task's failure must not end the pool
            log.warning("task failed", task=name, error=repr(exc))

    def run_scheduler(self, stop: threading.Event) -> None:
        """In-process beat: send each periodic task when due until `stop` is set."""
        periodic = schedule(self.settings)
        due = {name: time.monotonic() + every for name, every in periodic.items()}
        while not stop.is_set():
            now = time.monotonic()
            for name, every in periodic.items():
                if now >= due[name]:
                    due[name] = now + every
                    self.send(name)
            stop.wait(max(0.05, min(due.values()) - time.monotonic()))

    def start_scheduler(self) -> threading.Event | None:
        """With task_backend `inprocess`, this process sends the periodic tasks (node
        probes, batch sweeps, maintenance) itself; with `celery`, `charter beat` does.
        Returns the event that stops it."""
        if self._pool is None:
            return None
        stop = threading.Event()
        threading.Thread(target=self.run_scheduler, args=(stop,), daemon=True,
                         name="charter-scheduler").start()
        return stop

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
