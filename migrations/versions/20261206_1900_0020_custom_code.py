"""Versions that ship code their loaders would run (*.py files, auto_map in config.json).

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-06 19:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("custom_code", sa.Boolean(), nullable=False,
                                              server_default=sa.false()))
    # Versions registered before: flagged by the paths they pin (auto_map was not read).
    op.execute("UPDATE model_versions SET custom_code = true WHERE id IN "
               "(SELECT version_id FROM model_files WHERE lower(path) LIKE '%.py')")


def downgrade() -> None:
    op.drop_column("model_versions", "custom_code")
