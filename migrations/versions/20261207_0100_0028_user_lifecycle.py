"""Where each user came from and when their access ended (charter.identity.lifecycle).

`users.source`: `local` (made by an admin or the CLI), `sso` (just in time, at a first
sign-in) or `scim` (provisioned by the identity provider); existing users with an
identity provider's subject are `sso`. `users.deprovisioned_at`: when access ended.
`users.external_id`: the identity provider's own id for the user (SCIM `externalId`).
`users.updated_at`: when the user last changed (SCIM `meta.lastModified`).
`users.scim_deleted_at`: when the provider deleted it over SCIM (its row and trail stay;
SCIM answers 404 for it from then on). Plain ALTERs: SQLite keeps the table's triggers.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-07 01:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0028'
down_revision = '0027'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("source", sa.String(10), nullable=False,
                                     server_default="local"))
    op.add_column("users", sa.Column("external_id", sa.String(300), nullable=True))
    op.add_column("users", sa.Column("deprovisioned_at", sa.DateTime(timezone=True),
                                     nullable=True))
    op.add_column("users", sa.Column("updated_at", sa.DateTime(timezone=True),
                                     nullable=True))
    op.add_column("users", sa.Column("scim_deleted_at", sa.DateTime(timezone=True),
                                     nullable=True))
    op.execute("UPDATE users SET source = 'sso' WHERE external_subject IS NOT NULL")


def downgrade() -> None:
    op.drop_column("users", "scim_deleted_at")
    op.drop_column("users", "updated_at")
    op.drop_column("users", "deprovisioned_at")
    op.drop_column("users", "external_id")
    op.drop_column("users", "source")
