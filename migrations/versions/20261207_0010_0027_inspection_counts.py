"""Findings by day, team and type, counted from the audit log (charter.inspection.counts),
and how far that count has read it.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-07 00:10:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0027'
down_revision = '0026'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inspection_counts",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("team", sa.String(200), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("findings", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", "team", "type", name=op.f("pk_inspection_counts")),
    )
    op.create_table(
        "inspection_rollup",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inspection_rollup")),
    )
    op.execute("INSERT INTO inspection_rollup (id, seq) VALUES (1, 0)")


def downgrade() -> None:
    op.drop_table("inspection_rollup")
    op.drop_table("inspection_counts")
