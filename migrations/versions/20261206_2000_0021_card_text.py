"""The model card's text (its README's Markdown, without the front matter) kept with the
version, for the console to show (rendered without raw HTML).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06 20:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("card_text", sa.Text(), nullable=False,
                                              server_default=""))


def downgrade() -> None:
    op.drop_column("model_versions", "card_text")
