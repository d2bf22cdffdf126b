"""Retention of audit events: tombstones of purged events, and the rule that an event row
may be deleted only once its tombstone (same seq, same hash) is written.

UPDATE and TRUNCATE of audit_events stay refused; tombstones are append-only.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 02:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

PG_UP = """
CREATE FUNCTION charter_audit_purge_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM audit_purged WHERE seq = OLD.seq AND hash = OLD.hash) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_events is append-only: DELETE refused (an event is purged only '
        'after its tombstone is written)' USING ERRCODE = 'insufficient_privilege';
END $$;
DROP TRIGGER audit_events_no_update ON audit_events;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION charter_audit_append_only();
CREATE TRIGGER audit_events_purge_only BEFORE DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION charter_audit_purge_only();
CREATE TRIGGER audit_purged_no_update BEFORE UPDATE OR DELETE ON audit_purged
    FOR EACH ROW EXECUTE FUNCTION charter_audit_append_only();
CREATE TRIGGER audit_purged_no_truncate BEFORE TRUNCATE ON audit_purged
    FOR EACH STATEMENT EXECUTE FUNCTION charter_audit_append_only();
"""
PG_DOWN = """
DROP TRIGGER audit_events_purge_only ON audit_events;
DROP TRIGGER audit_events_no_update ON audit_events;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION charter_audit_append_only();
DROP FUNCTION charter_audit_purge_only();
"""
SQLITE_UP = (
    "DROP TRIGGER audit_events_no_delete",
    """CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
    WHEN NOT EXISTS (SELECT 1 FROM audit_purged WHERE seq = OLD.seq AND hash = OLD.hash)
    BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: DELETE refused'); END""",
    """CREATE TRIGGER audit_purged_no_update BEFORE UPDATE ON audit_purged
    BEGIN SELECT RAISE(ABORT, 'audit_purged is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER audit_purged_no_delete BEFORE DELETE ON audit_purged
    BEGIN SELECT RAISE(ABORT, 'audit_purged is append-only: DELETE refused'); END""",
)
SQLITE_DOWN = (
    "DROP TRIGGER audit_events_no_delete",
    """CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
    BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: DELETE refused'); END""",
)


def upgrade() -> None:
    op.create_table('audit_purged',
    sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('ts', sa.DateTime(timezone=True), nullable=False),
    sa.Column('action', sa.String(length=100), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('purged_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('checkpoint_size', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_audit_purged'))
    )
    dialect = op.get_bind().dialect.name
    if dialect == 'postgresql':
        op.execute(PG_UP)
    elif dialect == 'sqlite':
        for stmt in SQLITE_UP:
            op.execute(stmt)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == 'postgresql':
        op.execute(PG_DOWN)
    elif dialect == 'sqlite':
        for stmt in SQLITE_DOWN:
            op.execute(stmt)
    op.drop_table('audit_purged')
