"""dashboard sessions end for good, events by request id

A dashboard session was only a signed cookie: signing out dropped it from the browser, but a
copy taken before stayed good until it expired. Each sign-in is now a row, and signing out
(or revoking the key, through key_prefix) ends it for every copy. Events get an index on request_id, so the id a sender or a log line
shows finds its event at once.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24 13:15:26.876270
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import hub.store.models

revision: str = '0008'
down_revision: str | Sequence[str] | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('dashboard_sessions',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('key_prefix', sa.String(length=16), nullable=False),
    sa.Column('created_at', hub.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', hub.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('ended_at', hub.store.models.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dashboard_sessions'))
    )
    with op.batch_alter_table('dashboard_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dashboard_sessions_expires_at'), ['expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_dashboard_sessions_key_prefix'), ['key_prefix'], unique=False)

    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_request_id', ['request_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_request_id')

    with op.batch_alter_table('dashboard_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dashboard_sessions_key_prefix'))
        batch_op.drop_index(batch_op.f('ix_dashboard_sessions_expires_at'))

    op.drop_table('dashboard_sessions')
