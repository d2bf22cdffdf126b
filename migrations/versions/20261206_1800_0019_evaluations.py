"""Evaluation results attached to versions as evidence (lm-eval-harness, OpenCompass).

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06 18:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("version_id", sa.String(36), sa.ForeignKey("model_versions.id"),
                  nullable=False),
        sa.Column("format", sa.String(20), nullable=False),
        sa.Column("file_name", sa.String(300), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("model_named", sa.JSON(), nullable=False),
        sa.Column("revision", sa.String(100)),
        sa.Column("evaluated_at", sa.DateTime(timezone=True)),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("task_hashes", sa.JSON(), nullable=False),
        sa.Column("attached_by", sa.String(200), nullable=False),
        sa.Column("attached_by_user_id", sa.String(36), nullable=False),
        sa.Column("attached_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("version_id", "sha256", name="uq_evaluations_file"),
    )
    op.create_index("ix_evaluations_version_id", "evaluations", ["version_id"])


def downgrade() -> None:
    op.drop_index("ix_evaluations_version_id", table_name="evaluations")
    op.drop_table("evaluations")
