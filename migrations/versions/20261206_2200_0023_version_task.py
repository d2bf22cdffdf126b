"""A version's task (generation or embedding): which endpoints may serve it.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-06 22:00:00
"""
import json

import sqlalchemy as sa
from alembic import op

revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None

EMBEDDING_PIPELINE_TAGS = ("feature-extraction", "sentence-similarity")  # frozen here


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("task", sa.String(20), nullable=False,
                                              server_default="generation"))
    # Versions registered before: what their stored card's pipeline_tag says.
    bind = op.get_bind()
    versions = sa.table("model_versions", sa.column("id", sa.String), sa.column("card"),
                        sa.column("task", sa.String))
    embedding = []
    for row in bind.execute(sa.select(versions.c.id, versions.c.card)):
        card = json.loads(row.card) if isinstance(row.card, str) else (row.card or {})
        if isinstance(card, dict) and card.get("pipeline_tag") in EMBEDDING_PIPELINE_TAGS:
            embedding.append(row.id)
    if embedding:
        bind.execute(versions.update().where(versions.c.id.in_(embedding)).values(
            task="embedding"))


def downgrade() -> None:
    op.drop_column("model_versions", "task")
