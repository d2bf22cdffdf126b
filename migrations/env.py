"""Alembic environment: Charter's metadata, run online against the configured URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

import charter.audit.models  # noqa: F401 - registers tables on the metadata
import charter.batches.models  # noqa: F401
import charter.metering.models  # noqa: F401
import charter.identity.models  # noqa: F401
import charter.inspection.models  # noqa: F401
import charter.nodes.models  # noqa: F401
import charter.registry.models  # noqa: F401
from charter.db import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = config.attributes.get("charter_url") or config.get_main_option("sqlalchemy.url")
    connectable = config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline SQL generation is not supported; run `charter db upgrade`")
run_migrations_online()
