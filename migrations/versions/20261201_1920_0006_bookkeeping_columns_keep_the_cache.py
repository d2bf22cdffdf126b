"""Bookkeeping updates no longer advance the change generation.

A key's `last_used_at` (written at most every 5 minutes per key) and a node's
`last_probe_at`/`last_error` (every probe round) feed no cached read, yet each such update
cleared the read cache of every process: with many keys in use that happened several times
a second. The update triggers of `api_keys` and `nodes` now fire only when a column the
cache reads is set. A column added to either table later must be added to the list here
(tests/integration/test_migrations.py checks that every other column is in it).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 19:20:00
"""
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

# Every column but the bookkeeping ones: api_keys.last_used_at, nodes.last_probe_at/last_error.
WATCHED = {
    "api_keys": ("id", "user_id", "name", "secret_sha256", "created_at", "created_by",
                 "expires_at", "revoked_at"),
    "nodes": ("id", "name", "base_url", "region", "engine", "labels", "capacity",
              "admin_state", "attestation", "attested_version_id", "reported_model_id",
              "reported_revision", "quarantine_reason", "healthy", "created_at",
              "created_by", "row_version"),
}
BUMP = "UPDATE change_generation SET value = value + 1 WHERE id = 1;"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table, columns in WATCHED.items():
        cols = ", ".join(columns)
        if dialect == "postgresql":
            op.execute(f"DROP TRIGGER {table}_bump_generation ON {table}")
            op.execute(f"CREATE TRIGGER {table}_bump_generation AFTER INSERT OR DELETE OR "
                       f"TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION "
                       f"charter_bump_generation()")
            op.execute(f"CREATE TRIGGER {table}_bump_generation_update AFTER UPDATE OF {cols} "
                       f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION "
                       f"charter_bump_generation()")
        elif dialect == "sqlite":
            op.execute(f"DROP TRIGGER {table}_bump_update")
            op.execute(f"CREATE TRIGGER {table}_bump_update AFTER UPDATE OF {cols} ON {table} "
                       f"BEGIN {BUMP} END")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in WATCHED:
        if dialect == "postgresql":
            op.execute(f"DROP TRIGGER {table}_bump_generation_update ON {table}")
            op.execute(f"DROP TRIGGER {table}_bump_generation ON {table}")
            op.execute(f"CREATE TRIGGER {table}_bump_generation AFTER INSERT OR UPDATE OR "
                       f"DELETE OR TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION "
                       f"charter_bump_generation()")
        elif dialect == "sqlite":
            op.execute(f"DROP TRIGGER {table}_bump_update")
            op.execute(f"CREATE TRIGGER {table}_bump_update AFTER UPDATE ON {table} "
                       f"BEGIN {BUMP} END")
