"""Node agents: where a node's attestation agent answers, and the key it signs with.

`nodes.agent_url` and `nodes.agent_key` (base64 of an Ed25519 public key, enrolled by an
operator; replacing it is the rotation). A node with a key is attested by the digests its
agent signs (charter.nodes.statement), offline. Both columns feed the routes a worker
caches, so they join the update trigger's list (see 0006).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 12:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None

BEFORE = ("id", "name", "base_url", "region", "engine", "labels", "capacity", "admin_state",
          "attestation", "attested_version_id", "reported_model_id", "reported_revision",
          "quarantine_reason", "healthy", "created_at", "created_by", "row_version")
AFTER = (*BEFORE, "agent_url", "agent_key")
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
    # Plain ALTERs (no batch copy on SQLite, which would drop the table's triggers).
    op.add_column("nodes", sa.Column("agent_url", sa.String(500), nullable=True))
    op.add_column("nodes", sa.Column("agent_key", sa.String(64), nullable=True))
    _watch(AFTER)


def downgrade() -> None:
    _watch(BEFORE)  # first: SQLite drops no column a trigger names
    op.drop_column("nodes", "agent_key")
    op.drop_column("nodes", "agent_url")
