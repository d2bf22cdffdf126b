"""Background tasks: one set of thin tasks, run by Celery in production or in-process.

Every task takes ids and makes one service call; the state it works on is in the database,
so a task may run twice, late, or never (a lost message) without harm: the batch sweep
sends again what nobody took. With `task_backend=celery` the tasks go through the broker
(Redis, or RabbitMQ) to `charter worker` processes, and `charter beat` sends the periodic
ones; with `inprocess` (the embedded default) a thread pool runs them and a scheduler
thread in the serving process sends the periodic ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from celery import Celery

from charter.settings import Settings

log = structlog.get_logger("charter.tasks")

celery_app = Celery("charter", set_as_current=False)
_settings: Settings | None = None
_inprocess: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def configure(settings: Settings) -> None:
    """Use these settings for tasks sent and run by this process."""
    global _settings, _inprocess
    with _lock:
        if _settings is not None and _settings == settings:
            return
        _settings = settings
        if settings.task_backend == "celery":
            _configure_celery(settings)
        elif _inprocess is None:
            _inprocess = ThreadPoolExecutor(settings.task_inprocess_threads,
                                            thread_name_prefix="charter-task")


def settings() -> Settings:
    if _settings is None:
        raise RuntimeError("charter.tasks.configure(settings) has not been called")
    return _settings


def _configure_celery(s: Settings) -> None:
    celery_app.conf.update(
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
    return periodic


# --- the tasks ------------------------------------------------------------------------------

def _start_batch(batch_id: str) -> None:
    from charter.batches import service

    service.start_batch(batch_id)


def _run_lane(batch_id: str, lane: int) -> None:
    from charter.batches import lanes

    lanes.run_lane(batch_id, lane, settings())


def _sweep() -> None:
    from charter.batches import service

    service.sweep(settings())


def _probe() -> None:
    from charter.nodes.service import probe_round

    probe_round(settings())


def _maintenance() -> None:
    from charter.batches import files
    from charter.registry.service import expire_approvals

    expire_approvals()
    files.purge_expired_files(settings())
    from charter.audit.retention import purge

    purge(settings())


def _checkpoint() -> None:
    from charter.audit.checkpoints import issue

    issue(settings())


TASKS: dict[str, Callable[..., None]] = {
    "charter.audit.checkpoint": _checkpoint,
    "charter.batches.start": _start_batch,
    "charter.batches.lane": _run_lane,
    "charter.batches.sweep": _sweep,
    "charter.nodes.probe": _probe,
    "charter.maintenance": _maintenance,
}
for _name, _fn in TASKS.items():
    celery_app.task(name=_name, acks_late=True, ignore_result=True)(_fn)


def send(name: str, *args: Any) -> bool:
    """Queue a task; False (logged) if it could not be queued: the sweep will resend."""
    s = settings()
    if s.task_backend == "celery":
        try:
            celery_app.send_task(name, args=args, queue=s.task_queue)
        except Exception as exc:  # noqa: BLE001 - the broker is away; the state is safe
            log.warning("task not queued", task=name, error=repr(exc))
            return False
        return True
    assert _inprocess is not None
    _inprocess.submit(_run_inprocess, name, args)
    return True


def _run_inprocess(name: str, args: tuple[Any, ...]) -> None:
    try:
        TASKS[name](*args)
    except Exception as exc:  # noqa: BLE001 - a task's failure must not end the pool
        log.warning("task failed", task=name, error=repr(exc))


def run_scheduler(s: Settings, stop: threading.Event) -> None:
    """In-process beat: send each periodic task when due until `stop` is set."""
    due = {name: time.monotonic() + every for name, every in schedule(s).items()}
    while not stop.is_set():
        now = time.monotonic()
        for name, every in schedule(s).items():
            if now >= due[name]:
                due[name] = now + every
                send(name)
        stop.wait(max(0.05, min(due.values()) - time.monotonic()))
