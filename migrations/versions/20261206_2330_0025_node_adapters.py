"""The adapters a node's agent attested beside its base version (LoRA serving).

`nodes.attested_adapters`: version id -> the adapter's name on the engine. It feeds the
routes a worker caches, so it joins the update trigger's list (see 0006, 0014).

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-06 23:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0025'
down_revision = '0024'
branch_labels = None
depends_on = None

BEFORE = ("id", "name", "base_url", "region", "engine", "labels", "capacity", "admin_state",
          "attestation", "attested_version_id", "reported_model_id", "reported_revision",
          "quarantine_reason", "healthy", "created_at", "created_by", "row_version",
          "agent_url", "agent_key")
AFTER = (*BEFORE, "attested_adapters")
BUMP = "UPDATE change_generation SET value = value + 1 WHERE id = 1;"


def _watch(columns: tuple[str, ...]) -> None:
    cols = ", ".join(columns)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER nodes_bump_generation_update ON nodes")
        op.execute(f"CREATE TRIGGER nodes_bump_generation_update AFTER UPDATE OF {cols} "
                   f"ON nodes FOR EACH STATEMENT EXECUTE FUNCTION charter_bump_generation()")
    else:
        op.execute("DROP TRIGGER nodes_bump_update")
        op.execute(f"CREATE TRIGGER nodes_bump_update AFTER UPDATE OF {cols} ON nodes "
                   f"BEGIN {BUMP} END")


def upgrade() -> None:
    # A plain ALTER (no batch copy on SQLite, which would drop the table's triggers).
    op.add_column("nodes", sa.Column("attested_adapters", sa.JSON(), nullable=False,
                                     server_default="{}"))
    _watch(AFTER)


def downgrade() -> None:
    _watch(BEFORE)  # first: SQLite drops no column a trigger names
    op.drop_column("nodes", "attested_adapters")
