"""Shared fixtures: a fresh PostgreSQL database per test (cloned from a migrated template)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
import pytest
from sqlalchemy.engine import make_url

from charter import migrate, scope
from charter.actor import SYSTEM, Actor
from charter.boot import build_runtime
from charter.identity.service import actor_of, create_api_key, create_user
from charter.runtime import Runtime
from charter.settings import Settings
from tests.runtimes import close_runtimes, mark

ADMIN_URL = os.environ.get(
    "TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SECRET = "test-secret-key-that-is-long-enough-000"


def _admin() -> psycopg.Connection:
    return psycopg.connect(ADMIN_URL, autocommit=True)


def pg_url(name: str) -> str:
    url = make_url(ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    name = f"charter_tpl_{os.getpid()}"
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    migrate.upgrade(pg_url(name))
    yield name
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_pg() -> Iterator[str]:
    """An empty PostgreSQL database (no schema); yields its URL."""
    name = f"charter_t_{uuid.uuid4().hex[:10]}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pg_url(name)
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(pg_template: str) -> Iterator[str]:
    """A migrated PostgreSQL database of this test's own."""
    name = f"charter_t_{uuid.uuid4().hex[:10]}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield pg_url(name)
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings.from_env({}, database_url=database_url, secret_key=SECRET)


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    """The test's Runtime, bound (charter.scope) for the test's own service calls."""
    made = build_runtime(settings)
    try:
        with scope.bound(made):
            yield made
    finally:
        made.close()


@pytest.fixture
def configured(runtime: Runtime) -> Settings:
    return runtime.settings


@pytest.fixture
def app(runtime: Runtime):  # type: ignore[no-untyped-def]
    from charter.app import create_app

    return create_app(runtime)


@pytest.fixture(autouse=True)
def _close_runtimes() -> Iterator[None]:
    """Close the runtimes a test made with tests.runtimes (not its module fixtures')."""
    since = mark()
    yield
    close_runtimes(since)


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


@dataclass
class Person:
    actor: Actor
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def make_person(configured: Settings) -> Callable[..., Person]:
    def make(*roles: str, username: str | None = None, kind: str = "user") -> Person:
        name = username or f"{'-'.join(roles) or 'nobody'}-{uuid.uuid4().hex[:6]}"
        user = create_user(SYSTEM, username=name, kind=kind, roles=list(roles))
        return Person(actor_of(user), create_api_key(SYSTEM, user.id, name="test").token)

    return make


@pytest.fixture
def pg_conn(database_url: str) -> Iterator[psycopg.Connection]:
    """A raw superuser connection to the test database, for tampering like a DBA would."""
    url = make_url(database_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis of this module's own (tests.processes.RedisServer), for the limits' tests."""
    import shutil

    from tests.processes import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    server = RedisServer()
    server.start()
    yield server.url
    server.kill()
