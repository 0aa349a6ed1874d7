"""the audit log: one row per admin action, never updated

A new table, audit_log: when, who (an admin key's prefix, cli:<os user>, or hub), through
which face, from where, the action, its target and the change (secrets masked), written
by hub.services.audit in the transaction of the change it records. Indexed by time (the
retention's DELETE and the `since` filter) and by actor and by action, each with the id
the listing pages by, newest first.

A trigger refuses any UPDATE of its rows, on both databases: the hub never changes an entry,
and nothing that reaches the database through it can either. Rows are deleted only by the
log's retention (HUB_AUDIT_RETENTION_DAYS).

Nothing existing is touched. The downgrade drops the trigger and the table (the entries
with it).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0017'
down_revision: str | Sequence[str] | None = '0016'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
BIGID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
REFUSAL = 'audit_log is append-only: an entry is never changed'


def upgrade() -> None:
    op.create_table(
        'audit_log',
        sa.Column('id', BIGID, autoincrement=True, nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('actor', sa.String(length=100), nullable=False),
        sa.Column('face', sa.String(length=16), nullable=False),
        sa.Column('origin', sa.String(length=200), nullable=True),
        sa.Column('request_id', sa.String(length=200), nullable=True),
        sa.Column('action', sa.String(length=64), nullable=False),
        sa.Column('target', sa.String(length=200), nullable=True),
        sa.Column('change', JSON, nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log')),
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_at'), ['at'], unique=False)
        batch_op.create_index('ix_audit_log_actor_id', ['actor', 'id'], unique=False)
        batch_op.create_index('ix_audit_log_action_id', ['action', 'id'], unique=False)
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(
            "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN RAISE EXCEPTION '{REFUSAL}'; END $$"
        )
        op.execute(
            'CREATE TRIGGER audit_log_append_only BEFORE UPDATE ON audit_log '
            'FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()'
        )
    else:
        op.execute(
            'CREATE TRIGGER audit_log_append_only BEFORE UPDATE ON audit_log '
            f"BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END"
        )


def downgrade() -> None:
    op.execute('DROP TRIGGER IF EXISTS audit_log_append_only' + (
        ' ON audit_log' if op.get_bind().dialect.name == 'postgresql' else ''
    ))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('DROP FUNCTION IF EXISTS audit_log_append_only()')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_log_action_id')
        batch_op.drop_index('ix_audit_log_actor_id')
        batch_op.drop_index(batch_op.f('ix_audit_log_at'))
    op.drop_table('audit_log')
