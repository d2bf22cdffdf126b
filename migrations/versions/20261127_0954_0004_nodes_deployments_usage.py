"""Inference nodes with their attestation, deployments of approved versions, usage.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 09:54:40.377556
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('usage_counters',
    sa.Column('team_id', sa.String(length=36), nullable=False),
    sa.Column('serving_name', sa.String(length=200), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('requests', sa.Integer(), nullable=False),
    sa.Column('tokens_in', sa.BigInteger(), nullable=False),
    sa.Column('tokens_out', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('team_id', 'serving_name', 'day', name=op.f('pk_usage_counters'))
    )
    op.create_table('deployments',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('serving_name', sa.String(length=200), nullable=False),
    sa.Column('version_id', sa.String(length=36), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('row_version', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['model_versions.id'], name=op.f('fk_deployments_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deployments')),
    sa.UniqueConstraint('serving_name', name=op.f('uq_deployments_serving_name'))
    )
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deployments_version_id'), ['version_id'], unique=False)

    op.create_table('nodes',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('base_url', sa.String(length=500), nullable=False),
    sa.Column('region', sa.String(length=50), nullable=False),
    sa.Column('engine', sa.String(length=20), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('capacity', sa.Integer(), nullable=False),
    sa.Column('admin_state', sa.String(length=20), nullable=False),
    sa.Column('attestation', sa.String(length=20), nullable=False),
    sa.Column('attested_version_id', sa.String(length=36), nullable=True),
    sa.Column('reported_model_id', sa.String(length=300), nullable=True),
    sa.Column('reported_revision', sa.String(length=100), nullable=True),
    sa.Column('quarantine_reason', sa.Text(), nullable=False),
    sa.Column('healthy', sa.Boolean(), nullable=False),
    sa.Column('last_probe_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('row_version', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['attested_version_id'], ['model_versions.id'], name=op.f('fk_nodes_attested_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_nodes')),
    sa.UniqueConstraint('name', name=op.f('uq_nodes_name'))
    )
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_nodes_region'), ['region'], unique=False)

    op.create_table('deployment_nodes',
    sa.Column('deployment_id', sa.String(length=36), nullable=False),
    sa.Column('node_id', sa.String(length=36), nullable=False),
    sa.ForeignKeyConstraint(['deployment_id'], ['deployments.id'], name=op.f('fk_deployment_nodes_deployment_id_deployments')),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.id'], name=op.f('fk_deployment_nodes_node_id_nodes')),
    sa.PrimaryKeyConstraint('deployment_id', 'node_id', name=op.f('pk_deployment_nodes'))
    )
    with op.batch_alter_table('deployment_nodes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deployment_nodes_node_id'), ['node_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('deployment_nodes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deployment_nodes_node_id'))

    op.drop_table('deployment_nodes')
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_nodes_region'))

    op.drop_table('nodes')
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deployments_version_id'))

    op.drop_table('deployments')
    op.drop_table('usage_counters')
