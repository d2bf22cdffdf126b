"""The identity provider's groups, as it provisions them over SCIM, and their members
(charter.identity.scim). A group maps to roles and a team through CHARTER_OIDC_ROLE_MAP and
CHARTER_OIDC_TEAM_MAP, the same maps as an SSO sign-in's groups claim: what a member gets
is written to user_roles and team_members, whose changes advance the change generation.

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-07 02:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0029'
down_revision = '0028'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scim_groups",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("external_id", sa.String(300), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("row_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scim_groups")),
        sa.UniqueConstraint("display_name", name=op.f("uq_scim_groups_display_name")),
    )
    op.create_table(
        "scim_group_members",
        sa.Column("group_id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("display", sa.String(200), nullable=True),
        sa.ForeignKeyConstraint(["group_id"], ["scim_groups.id"],
                                name=op.f("fk_scim_group_members_group_id_scim_groups")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"],
                                name=op.f("fk_scim_group_members_user_id_users")),
        sa.PrimaryKeyConstraint("group_id", "user_id", name=op.f("pk_scim_group_members")),
    )
    op.create_index(op.f("ix_scim_group_members_user_id"), "scim_group_members", ["user_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_scim_group_members_user_id"), table_name="scim_group_members")
    op.drop_table("scim_group_members")
    op.drop_table("scim_groups")
