"""A change generation that triggers advance with every change to cached tables.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 10:45:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

# Every table whose rows feed the per-process read cache (charter.snapshot).
TABLES = ("users", "user_roles", "api_keys", "teams", "team_members", "models",
          "model_versions", "approval_decisions", "policy_exceptions", "nodes",
          "deployments", "deployment_nodes")
PG_FUNCTION = """
CREATE FUNCTION charter_bump_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE change_generation SET value = value + 1 WHERE id = 1;
    RETURN NULL;
END;
$$;
"""


def upgrade() -> None:
    op.create_table(
        'change_generation',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('value', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_change_generation')),
    )
    op.execute("INSERT INTO change_generation (id, value) VALUES (1, 0)")
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(PG_FUNCTION)
        for table in TABLES:
            op.execute(f"CREATE TRIGGER {table}_bump_generation AFTER INSERT OR UPDATE OR "
                       f"DELETE OR TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION "
                       f"charter_bump_generation()")
    elif dialect == "sqlite":
        for table in TABLES:
            for event in ("INSERT", "UPDATE", "DELETE"):
                op.execute(f"CREATE TRIGGER {table}_bump_{event.lower()} AFTER {event} ON "
                           f"{table} BEGIN UPDATE change_generation SET value = value + 1 "
                           f"WHERE id = 1; END")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        for table in TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_bump_generation ON {table}")
        op.execute("DROP FUNCTION IF EXISTS charter_bump_generation()")
    elif dialect == "sqlite":
        for table in TABLES:
            for event in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_bump_{event}")
    op.drop_table('change_generation')
