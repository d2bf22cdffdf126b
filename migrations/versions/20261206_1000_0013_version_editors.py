"""Everyone who changed a version's content: `model_versions.editor_user_ids`.

Separation of duties: the creator, every editor and the submitter of a version may not
approve or reject it. The column lists the user ids of all of them (the creator first).
Existing rows are filled from what is known: the creator, the submitter, and the actors of
the `version.update` events the audit log holds for the version (`user:<name>` and
`service:<name>` mapped to their user ids).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 10:00:00
"""
import json

import sqlalchemy as sa
from alembic import op


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('model_versions', sa.Column('editor_user_ids', sa.JSON(), nullable=False,
                                              server_default='[]'))
    conn = op.get_bind()
    users = {f"{kind}:{name}": uid for uid, name, kind in conn.execute(
        sa.text("SELECT id, username, kind FROM users"))}
    edits: dict[str, list[str]] = {}
    for target, actor in conn.execute(sa.text(
            "SELECT target_id, actor FROM audit_events WHERE action = 'version.update' "
            "AND outcome = 'success' AND target_type = 'model_version' ORDER BY seq")):
        if actor in users:
            edits.setdefault(target, []).append(users[actor])
    for vid, created, submitted in conn.execute(sa.text(
            "SELECT id, created_by_user_id, submitted_by_user_id FROM model_versions")):
        ids: list[str] = []
        for uid in [created, *edits.get(vid, []), submitted]:
            if uid and uid not in ids:
                ids.append(uid)
        conn.execute(sa.text("UPDATE model_versions SET editor_user_ids = :ids WHERE id = :id"),
                     {"ids": json.dumps(ids), "id": vid})


def downgrade() -> None:
    with op.batch_alter_table('model_versions') as batch:
        batch.drop_column('editor_user_ids')
