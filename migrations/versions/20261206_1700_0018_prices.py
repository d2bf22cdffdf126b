"""Prices of model versions' tokens, per million, for the chargeback report (optional).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06 17:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "prices",
        sa.Column("version_id", sa.String(36), primary_key=True),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("input_per_million", sa.Numeric(18, 6), nullable=False),
        sa.Column("output_per_million", sa.Numeric(18, 6), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("prices")
