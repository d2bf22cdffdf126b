"""The embedded database's change-generation triggers on model_versions, again.

Migration 0022 altered model_versions with a batch copy, which on SQLite drops the
table's triggers: changes to versions stopped advancing the change generation there, so
a process could serve from a read cache older than a revocation (PostgreSQL was never
affected: it alters in place). 0022 now restores them itself; this puts them back in
embedded databases that ran the earlier 0022.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-06 23:00:00
"""
from alembic import op

revision = '0024'
down_revision = '0023'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for event in ("INSERT", "UPDATE", "DELETE"):
        op.execute(f"CREATE TRIGGER IF NOT EXISTS model_versions_bump_{event.lower()} AFTER "
                   f"{event} ON model_versions BEGIN UPDATE change_generation SET value = "
                   f"value + 1 WHERE id = 1; END")


def downgrade() -> None:
    pass  # the triggers belong to 0005: they stay
