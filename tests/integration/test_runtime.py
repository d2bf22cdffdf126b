"""Runtimes: two in one process never meet; a closed one lets go of what it held."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Iterator

import pytest

from charter import scope
from charter.actor import SYSTEM
from charter.audit.chain import GENESIS_HASH
from charter.audit.service import head
from charter.boot import build_runtime
from charter.identity.service import create_user, list_users
from charter.runtime import Runtime
from charter.settings import Settings
from tests.conftest import SECRET, _admin, pg_url


@pytest.fixture
def second_database(pg_template: str) -> Iterator[str]:
    name = f"charter_t_{uuid.uuid4().hex[:10]}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield pg_url(name)
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_two_runtimes_in_one_process_do_not_see_each_other(runtime: Runtime,
                                                           second_database: str) -> None:
    other = build_runtime(Settings.from_env({}, database_url=second_database,
                                            secret_key=SECRET))
    try:
        parts = ("database", "policies", "tasks", "readcache", "node_pool", "outstanding",
                 "authenticator", "metrics")
        assert all(getattr(runtime, p) is not getattr(other, p) for p in parts)
        assert runtime.writer is not other.writer
        assert runtime.tasks.celery is not other.tasks.celery

        create_user(SYSTEM, username="only-in-the-first", roles=["user"])
        seen: dict[str, object] = {}

        def in_other() -> None:  # another thread, the other runtime bound there
            with scope.bound(other):
                seen["users"] = [u.username for u in list_users()]
                seen["head"] = head()
                create_user(SYSTEM, username="only-in-the-second", roles=["user"])

        thread = threading.Thread(target=in_other)
        thread.start()
        thread.join(timeout=30)
        assert "only-in-the-first" not in seen["users"]  # type: ignore[operator]
        assert seen["head"] == (0, GENESIS_HASH)  # its own, empty log
        assert head()[0] >= 1  # the first's has the user's event
        assert "only-in-the-second" not in [u.username for u in list_users()]
        assert scope.current() is runtime  # this context's binding never moved
    finally:
        other.close()


def test_two_apps_in_one_process_serve_their_own_runtime(runtime: Runtime,
                                                         second_database: str) -> None:
    from charter.app import create_app

    other = build_runtime(dataclasses.replace(runtime.settings, database_url=second_database))
    try:
        first_app, second_app = create_app(runtime), create_app(other)
        with scope.bound(other):
            create_user(SYSTEM, username="second-admin", roles=["admin"])
        r1 = first_app.test_client().get("/metrics")
        r2 = second_app.test_client().get("/metrics")
        assert r1.status_code == r2.status_code == 200
        # Each app counts its own requests, in its own registry.
        first_app.test_client().get("/healthz")
        count = 'charter_http_requests_total{endpoint="healthz",method="GET",status="200"}'
        assert f"{count} 1.0" in first_app.test_client().get("/metrics").get_data(as_text=True)
        assert count not in second_app.test_client().get("/metrics").get_data(as_text=True)
    finally:
        other.close()


def test_code_outside_any_binding_is_told_so() -> None:
    from charter.uow import unit_of_work

    outside: list[BaseException] = []

    def run() -> None:
        try:
            with unit_of_work():
                pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            outside.append(exc)

    thread = threading.Thread(target=run)  # a new thread starts with no binding
    thread.start()
    thread.join()
    assert len(outside) == 1 and isinstance(outside[0], scope.NotBoundError)


def test_a_closed_runtime_writes_what_it_queued_and_refuses_more(settings: Settings) -> None:
    from charter.audit.journal import Event
    from charter.audit.writer import Entry

    made = build_runtime(settings)
    with scope.bound(made):
        before = head()[0]
        made.writer.defer(Entry(events=(Event.of(actor="system", action="test.outcome",
                                                  target_type="t", target_id="1"),)))
    made.close()
    with scope.bound(build_runtime(settings)) as again:
        try:
            assert head()[0] == before + 1  # the deferred event was written on close
        finally:
            again.close()
    with pytest.raises(RuntimeError, match="closed"):
        made.writer  # noqa: B018 - a closed runtime makes no new parts
