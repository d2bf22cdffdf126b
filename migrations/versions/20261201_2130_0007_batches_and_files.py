"""Uploaded files, OpenAI-style batches and their lines (issue 6).

A batch's state lives in these tables, not in the broker: `batch_lines` holds each line's
request, its running attempt (claim token and lease) and its answer, so lines survive a
killed worker or a restarted broker and are done once. File content is kept in `files`
until retention purges it (`purged_at`; the digest stays).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 21:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('files',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('owner_user_id', sa.String(length=36), nullable=False),
    sa.Column('purpose', sa.String(length=20), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('bytes', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('lines', sa.Integer(), nullable=False),
    sa.Column('invalid_lines', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('purged_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('content', sa.LargeBinary(), nullable=True),
    sa.ForeignKeyConstraint(['owner_user_id'], ['users.id'], name=op.f('fk_files_owner_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_files'))
    )
    op.create_index(op.f('ix_files_owner_user_id'), 'files', ['owner_user_id'], unique=False)
    op.create_table('batches',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('owner_user_id', sa.String(length=36), nullable=False),
    sa.Column('actor_ref', sa.String(length=200), nullable=False),
    sa.Column('endpoint', sa.String(length=50), nullable=False),
    sa.Column('input_file_id', sa.String(length=40), nullable=False),
    sa.Column('completion_window', sa.String(length=10), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('data_class', sa.String(length=50), nullable=True),
    sa.Column('purpose', sa.String(length=50), nullable=True),
    sa.Column('metadata', sa.JSON(), nullable=True),
    sa.Column('errors', sa.JSON(), nullable=False),
    sa.Column('output_file_id', sa.String(length=40), nullable=True),
    sa.Column('error_file_id', sa.String(length=40), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('in_progress_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finalizing_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('failed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('expired_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancelling_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['error_file_id'], ['files.id'], name=op.f('fk_batches_error_file_id_files')),
    sa.ForeignKeyConstraint(['input_file_id'], ['files.id'], name=op.f('fk_batches_input_file_id_files')),
    sa.ForeignKeyConstraint(['output_file_id'], ['files.id'], name=op.f('fk_batches_output_file_id_files')),
    sa.ForeignKeyConstraint(['owner_user_id'], ['users.id'], name=op.f('fk_batches_owner_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batches'))
    )
    op.create_index(op.f('ix_batches_owner_user_id'), 'batches', ['owner_user_id'], unique=False)
    op.create_index(op.f('ix_batches_status'), 'batches', ['status'], unique=False)
    op.create_table('batch_lines',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('batch_id', sa.String(length=40), nullable=False),
    sa.Column('line_no', sa.Integer(), nullable=False),
    sa.Column('custom_id', sa.String(length=200), nullable=True),
    sa.Column('request', sa.JSON(), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('claim', sa.String(length=32), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=True),
    sa.Column('response_status', sa.Integer(), nullable=True),
    sa.Column('response_body', sa.Text(), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('node', sa.String(length=100), nullable=True),
    sa.Column('decision_id', sa.String(length=64), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_batch_lines_batch_id_batches')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batch_lines')),
    sa.UniqueConstraint('batch_id', 'line_no', name='uq_batch_lines_batch_line')
    )
    op.create_index('ix_batch_lines_batch_status', 'batch_lines', ['batch_id', 'status'], unique=False)
    op.create_index('ix_batch_lines_open', 'batch_lines', ['batch_id', 'line_no'], unique=False,
                    postgresql_where=sa.text("status IN ('pending', 'running')"),
                    sqlite_where=sa.text("status IN ('pending', 'running')"))
    if op.get_bind().dialect.name == "postgresql":
        # A node's batch slots tried in one round trip: the first free one is taken.
        op.execute("""
CREATE FUNCTION charter_take_slot(ns integer, keys integer[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE k integer;
BEGIN
  FOREACH k IN ARRAY keys LOOP
    IF pg_try_advisory_lock(ns, k) THEN RETURN k; END IF;
  END LOOP;
  RETURN NULL;
END $$""")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION charter_take_slot(integer, integer[])")
    op.drop_index('ix_batch_lines_open', table_name='batch_lines')
    op.drop_index('ix_batch_lines_batch_status', table_name='batch_lines')
    op.drop_table('batch_lines')
    op.drop_index(op.f('ix_batches_status'), table_name='batches')
    op.drop_index(op.f('ix_batches_owner_user_id'), table_name='batches')
    op.drop_table('batches')
    op.drop_index(op.f('ix_files_owner_user_id'), table_name='files')
    op.drop_table('files')
