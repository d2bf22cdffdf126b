"""A derived version's base as a link to another registered version (not only a name).

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06 21:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None


def _triggers() -> None:
    """SQLite's batch copy drops the table's triggers: the change generation's (0005)
    are made again, or version changes would no longer clear the read cache."""
    if op.get_bind().dialect.name != "sqlite":
        return
    for event in ("INSERT", "UPDATE", "DELETE"):
        op.execute(f"CREATE TRIGGER IF NOT EXISTS model_versions_bump_{event.lower()} AFTER "
                   f"{event} ON model_versions BEGIN UPDATE change_generation SET value = "
                   f"value + 1 WHERE id = 1; END")


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:  # SQLite copies the table
        batch.add_column(sa.Column("base_version_id", sa.String(36), nullable=True))
        batch.create_foreign_key("fk_model_versions_base", "model_versions",
                                 ["base_version_id"], ["id"])
        batch.create_index("ix_model_versions_base_version_id", ["base_version_id"])
    _triggers()


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_index("ix_model_versions_base_version_id")
        batch.drop_constraint("fk_model_versions_base", type_="foreignkey")
        batch.drop_column("base_version_id")
    _triggers()
