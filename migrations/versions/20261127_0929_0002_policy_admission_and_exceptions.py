"""Admission findings on versions, their derivation, and policy exceptions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 09:29:38.442492
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('policy_exceptions',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('version_id', sa.String(length=36), nullable=False),
    sa.Column('codes', sa.JSON(), nullable=False),
    sa.Column('justification', sa.Text(), nullable=False),
    sa.Column('granted_by', sa.String(length=200), nullable=False),
    sa.Column('granted_by_user_id', sa.String(length=36), nullable=False),
    sa.Column('granted_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('decision_id', sa.String(length=36), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['model_versions.id'], name=op.f('fk_policy_exceptions_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_policy_exceptions'))
    )
    with op.batch_alter_table('policy_exceptions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_policy_exceptions_version_id'), ['version_id'], unique=False)

    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('derivation', sa.String(length=20), nullable=False,
                                      server_default='unknown'))
        batch_op.add_column(sa.Column('admission', sa.JSON(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_column('admission')
        batch_op.drop_column('derivation')

    with op.batch_alter_table('policy_exceptions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_policy_exceptions_version_id'))

    op.drop_table('policy_exceptions')
