"""Engine, session factory and unit_of_work(): one transaction per service call."""

from __future__ import annotations

import atexit
import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, NoReturn

from sqlalchemy import BigInteger, DateTime, Integer, MetaData, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.types import TypeDecorator

from charter.errors import (
    CharterError,
    ConflictError,
    DatabaseUnavailableError,
    StaleVersionError,
    ValidationFailedError,
)
from charter.settings import Settings

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ChangeGeneration(Base):
    """One row: advanced by triggers on every change to the tables the read cache uses."""

    __tablename__ = "change_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, nullable=False)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Database:
    def __init__(self, url: str, *, pool_size: int = 5, pool_timeout: float = 5.0,
                 outcome_linger_s: float = 0.2) -> None:
        self.url = url
        self.outcome_linger_s = outcome_linger_s
        self._writer: Any = None
        self._writer_lock = threading.Lock()
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_size=pool_size, pool_timeout=pool_timeout, pool_pre_ping=True)
        self.engine: Engine = create_engine(url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            _sqlite_serialized_writes(self.engine)
        self.sessions = sessionmaker(bind=self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def writer(self) -> Any:
        """The gateway's group-commit audit writer (charter.audit.writer), made on first use."""
        if self._writer is None:
            with self._writer_lock:
                if self._writer is None:
                    from charter.audit.writer import make_writer

                    self._writer = make_writer(self, linger_s=self.outcome_linger_s)
        return self._writer

    def dispose(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()  # writes what is still queued
        self.engine.dispose()


def _sqlite_serialized_writes(engine: Engine) -> None:
    # pysqlite opens transactions lazily, so two writers could both read the audit head
    # before either writes. BEGIN IMMEDIATE takes the write lock up front.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


_database: Database | None = None
_session_var: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "charter_session", default=None
)


def configure(settings: Settings) -> Database:
    """Make the settings' database the one unit_of_work() uses; returns it."""
    global _database
    if _database is not None and _database.url == settings.database_url:
        return _database
    if _database is not None:
        _database.dispose()
    _forget_cached_reads()
    _database = Database(
        settings.database_url,
        pool_size=settings.db_pool_size,
        pool_timeout=settings.db_pool_timeout_s,
        outcome_linger_s=settings.audit_outcome_linger_s,
    )
    return _database


def flush_writer() -> None:
    """Write the audit events still queued (at exit, and from gunicorn's worker_exit)."""
    database = _database
    if database is not None and database._writer is not None:
        database._writer.flush()


atexit.register(flush_writer)


def get_database() -> Database:
    if _database is None:
        raise RuntimeError("charter.db.configure(settings) has not been called")
    return _database


def reset() -> None:
    global _database
    if _database is not None:
        _database.dispose()
    _database = None
    _forget_cached_reads()


def _forget_cached_reads() -> None:
    from charter.snapshot import SNAPSHOT  # it reads through this module

    SNAPSHOT.clear()


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """Commit on success, roll back on error, map driver errors to CharterError.

    A nested call joins the outer transaction. A CharterError marked `.audited(...)`
    is recorded in the audit log in a fresh transaction after the rollback.
    """
    outer = _session_var.get()
    if outer is not None:
        yield outer
        return
    session = get_database().sessions()
    token = _session_var.set(session)
    try:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            _session_var.reset(token)
            session.close()
    except CharterError as exc:
        if exc.audit is not None:
            _record_refusal(exc)
        raise
    except StaleDataError as exc:
        raise StaleVersionError(
            "the record was changed by someone else; reload it and try again"
        ) from exc
    except sa_exc.IntegrityError as exc:
        raise ConflictError(
            "the change conflicts with existing data",
            details={"reason": str(exc.orig).splitlines()[0] if exc.orig else "integrity"},
        ) from exc
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
        raise DatabaseUnavailableError("the database is unavailable; try again later") from exc
    except sa_exc.DataError as exc:
        # A value the column cannot hold (a number out of range, say): the caller's input,
        # which the API's schemas bound; this is the net beneath them.
        raise ValidationFailedError(
            "a value is out of range for what Charter stores",
            details={"errors": [{"field": "body", "code": "out_of_range",
                                 "message": str(exc.orig).splitlines()[0][:200]
                                 if exc.orig else "out of range"}]}) from exc
    except sa_exc.ProgrammingError as exc:
        if getattr(exc.orig, "sqlstate", None) != "42501":  # insufficient_privilege
            raise
        # The app's role may not write a table it must (the audit log, say): nothing was
        # changed, and nothing may go on unrecorded. An operator's problem, not the caller's.
        raise DatabaseUnavailableError(
            "the database refused a write this action needs (permission denied); nothing "
            "was changed", details={"reason": "permission_denied"}) from exc


def refuse(exc: CharterError) -> NoReturn:
    """Raise an audited refusal. Inside a unit of work it is recorded after the rollback;
    outside one it is recorded now, in a transaction of its own."""
    if _session_var.get() is None and exc.audit is not None:
        _record_refusal(exc)
    raise exc


def _record_refusal(exc: CharterError) -> None:
    from charter.audit import service as audit

    refusal = exc.audit
    assert refusal is not None
    exc.audit = None  # written once, even if re-raised through another unit of work
    with unit_of_work():
        audit.append_event(
            actor=refusal.actor,
            action=refusal.action,
            target_type=refusal.target_type,
            target_id=refusal.target_id,
            outcome="denied",
            details={"code": exc.code, "message": exc.message, **exc.details},
        )
