"""Alembic wiring: where the migrations live, upgrade/downgrade, and the schema check."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

FIX_COMMAND = "charter db upgrade"


def migrations_dir() -> Path:
    # The repository's migrations/ (Charter installs editable, or from the source tree).
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    cfg.attributes["charter_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


@dataclass(frozen=True)
class SchemaStatus:
    database_revision: str | None
    code_revision: str

    @property
    def current(self) -> bool:
        return self.database_revision == self.code_revision

    @property
    def message(self) -> str:
        if self.current:
            return "schema is current"
        found = self.database_revision or "empty (no schema)"
        return (
            f"the database schema is at {found}, this Charter expects {self.code_revision}: "
            f"run `{FIX_COMMAND}`"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "database_revision": self.database_revision,
            "code_revision": self.code_revision,
            "current": self.current,
            "fix": None if self.current else FIX_COMMAND,
        }


def schema_status(engine: Engine) -> SchemaStatus:
    script = ScriptDirectory(str(migrations_dir()))
    head = script.get_current_head()
    assert head is not None, "no migrations found"
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return SchemaStatus(current, head)
