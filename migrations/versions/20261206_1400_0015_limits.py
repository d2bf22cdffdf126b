"""Limits per team and per API key (charter.metering.limits).

`teams.limits` and `api_keys.limits`: JSON objects of requests and tokens per minute,
tokens per day and month, and concurrent streams; NULL: no limits. A key's limits feed
the gateway's cached reads, so the column joins api_keys' update trigger list (see 0006);
every update of `teams` already advances the change generation.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 14:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None

BEFORE = ("id", "user_id", "name", "secret_sha256", "created_at", "created_by", "expires_at",
          "revoked_at")
AFTER = (*BEFORE, "limits")
BUMP = "UPDATE change_generation SET value = value + 1 WHERE id = 1;"


def _watch(columns: tuple[str, ...]) -> None:
    cols = ", ".join(columns)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER api_keys_bump_generation_update ON api_keys")
        op.execute(f"CREATE TRIGGER api_keys_bump_generation_update AFTER UPDATE OF {cols} "
                   f"ON api_keys FOR EACH STATEMENT EXECUTE FUNCTION charter_bump_generation()")
    else:
        op.execute("DROP TRIGGER api_keys_bump_update")
        op.execute(f"CREATE TRIGGER api_keys_bump_update AFTER UPDATE OF {cols} ON api_keys "
                   f"BEGIN {BUMP} END")


def upgrade() -> None:
    # Plain ALTERs (no batch copy on SQLite, which would drop the tables' triggers).
    op.add_column("teams", sa.Column("limits", sa.JSON(), nullable=True))
    op.add_column("api_keys", sa.Column("limits", sa.JSON(), nullable=True))
    _watch(AFTER)


def downgrade() -> None:
    _watch(BEFORE)  # first: SQLite drops no column a trigger names
    op.drop_column("api_keys", "limits")
    op.drop_column("teams", "limits")
