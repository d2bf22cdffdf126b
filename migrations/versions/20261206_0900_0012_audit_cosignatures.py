"""Witness cosignatures of the audit log's checkpoints.

`audit_cosignatures` holds each cosignature a witness returned for a checkpoint (C2SP
tlog-cosignature: a signature line by the witness's key over the checkpoint note).
Append-only like the checkpoints (triggers refuse UPDATE, DELETE and TRUNCATE); an insider
who deletes rows anyway only takes witnesses away, which a quorum check finds.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 09:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

TABLE = 'audit_cosignatures'


def upgrade() -> None:
    op.create_table(TABLE,
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('checkpoint_id', sa.BigInteger(), nullable=False),
    sa.Column('witness', sa.String(length=300), nullable=False),
    sa.Column('cosigned_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('line', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['checkpoint_id'], ['audit_checkpoints.id'], name=op.f('fk_audit_cosignatures_checkpoint_id_audit_checkpoints')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_cosignatures'))
    )
    op.create_index(op.f('ix_audit_cosignatures_checkpoint_id'), TABLE, ['checkpoint_id'], unique=False)
    dialect = op.get_bind().dialect.name
    if dialect == 'postgresql':
        op.execute(f"""
CREATE TRIGGER {TABLE}_no_update BEFORE UPDATE OR DELETE ON {TABLE}
    FOR EACH ROW EXECUTE FUNCTION charter_audit_append_only();
CREATE TRIGGER {TABLE}_no_truncate BEFORE TRUNCATE ON {TABLE}
    FOR EACH STATEMENT EXECUTE FUNCTION charter_audit_append_only();
""")
    elif dialect == 'sqlite':
        for verb in ('UPDATE', 'DELETE'):
            op.execute(f"""CREATE TRIGGER {TABLE}_no_{verb.lower()} BEFORE {verb} ON {TABLE}
    BEGIN SELECT RAISE(ABORT, '{TABLE} is append-only: {verb} refused'); END""")


def downgrade() -> None:
    op.drop_index(op.f('ix_audit_cosignatures_checkpoint_id'), table_name=TABLE)
    op.drop_table(TABLE)
