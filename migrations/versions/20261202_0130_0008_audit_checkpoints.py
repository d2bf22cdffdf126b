"""Signed checkpoints of the audit log's Merkle tree, the tree's stored nodes, signing keys.

`audit_checkpoints` and `audit_tree_nodes` are append-only like `audit_events` (triggers
refuse UPDATE, DELETE and TRUNCATE): a checkpoint, once signed, is evidence.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 01:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

GUARDED = ('audit_checkpoints', 'audit_tree_nodes')


def _pg_guard(table: str) -> str:
    return f"""
CREATE TRIGGER {table}_no_update BEFORE UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION charter_audit_append_only();
CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION charter_audit_append_only();
"""


def _sqlite_guard(table: str) -> tuple[str, ...]:
    return tuple(
        f"""CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table}
    BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} refused'); END"""
        for verb in ("UPDATE", "DELETE"))


def upgrade() -> None:
    op.create_table('audit_checkpoints',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('root_hash', sa.String(length=64), nullable=False),
    sa.Column('issued_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('keys', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_checkpoints'))
    )
    op.create_index(op.f('ix_audit_checkpoints_issued_at'), 'audit_checkpoints', ['issued_at'], unique=False)
    op.create_index(op.f('ix_audit_checkpoints_size'), 'audit_checkpoints', ['size'], unique=False)
    op.create_table('audit_keys',
    sa.Column('verifier', sa.String(length=200), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('key_id', sa.String(length=8), nullable=False),
    sa.Column('first_used_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('verifier', name=op.f('pk_audit_keys'))
    )
    op.create_table('audit_tree_nodes',
    sa.Column('level', sa.SmallInteger(), autoincrement=False, nullable=False),
    sa.Column('idx', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('hash', sa.LargeBinary(length=32), nullable=False),
    sa.PrimaryKeyConstraint('level', 'idx', name=op.f('pk_audit_tree_nodes'))
    )
    dialect = op.get_bind().dialect.name
    for table in GUARDED:
        if dialect == 'postgresql':
            op.execute(_pg_guard(table))
        elif dialect == 'sqlite':
            for stmt in _sqlite_guard(table):
                op.execute(stmt)


def downgrade() -> None:
    # Dropping a table drops its triggers (the shared function stays with audit_events).
    op.drop_table('audit_tree_nodes')
    op.drop_table('audit_keys')
    op.drop_index(op.f('ix_audit_checkpoints_size'), table_name='audit_checkpoints')
    op.drop_index(op.f('ix_audit_checkpoints_issued_at'), table_name='audit_checkpoints')
    op.drop_table('audit_checkpoints')
