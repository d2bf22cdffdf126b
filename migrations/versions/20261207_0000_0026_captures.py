"""Investigation captures and their encrypted records (charter.inspection.captures).

`captures` feeds the routes a worker caches (a request of a team under a running capture
is recorded), so its changes advance the change generation like the registry's (see
0005); `capture_records` does not (a record is written on every captured request).

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-07 00:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0026'
down_revision = '0025'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "captures",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("team_id", sa.String(36), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("hours", sa.Integer(), nullable=False),
        sa.Column("retain_days", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("requested_by", sa.String(200), nullable=False),
        sa.Column("requested_by_user_id", sa.String(36), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_by", sa.String(200), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decision_note", sa.Text(), nullable=True),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("purge_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(200), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("key_id", sa.String(40), nullable=True),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=True),
        sa.Column("row_version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], name=op.f("fk_captures_team_id_teams")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_captures")),
    )
    op.create_index(op.f("ix_captures_team_id"), "captures", ["team_id"])
    op.create_table(
        "capture_records",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("capture_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("serving_name", sa.String(200), nullable=False),
        sa.Column("decision_id", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["capture_id"], ["captures.id"],
                                name=op.f("fk_capture_records_capture_id_captures")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_capture_records")),
    )
    op.create_index("ix_capture_records_capture_created", "capture_records",
                    ["capture_id", "created_at"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE TRIGGER captures_bump_generation AFTER INSERT OR UPDATE OR DELETE "
                   "OR TRUNCATE ON captures FOR EACH STATEMENT EXECUTE FUNCTION "
                   "charter_bump_generation()")
    else:
        for event in ("INSERT", "UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER captures_bump_{event.lower()} AFTER {event} ON "
                       f"captures BEGIN UPDATE change_generation SET value = value + 1 "
                       f"WHERE id = 1; END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS captures_bump_generation ON captures")
    else:
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS captures_bump_{event}")
    op.drop_index("ix_capture_records_capture_created", table_name="capture_records")
    op.drop_table("capture_records")
    op.drop_index(op.f("ix_captures_team_id"), table_name="captures")
    op.drop_table("captures")
