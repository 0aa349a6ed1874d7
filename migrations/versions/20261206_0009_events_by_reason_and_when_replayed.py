"""events by reason, and when an event was last replayed

The admin listing's `reason` filter had no index: a rare reason walked the whole
received_at index (2,383 ms on SQLite, 188 ms on PostgreSQL at 300,000 events). It gets
(reason, received_at, id), like route, status and key; request_id's index becomes
(request_id, received_at, id) too, so a sender that sends the same X-Request-ID every time
does not make its filter sort every event it sent. Events get `replayed_at`, set by a
replay, so route statistics can leave replayed events out of their latency figures (a
replay's completion measures when an admin replayed, not the hub). Events replayed before
this migration can't be told apart and keep counting.

At 300,000 events it takes 1.5 s on SQLite and 2.3 s on PostgreSQL (writes wait meanwhile):
the column is added in place, and the two indexes are built.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import hub.store.models

revision: str = '0009'
down_revision: str | Sequence[str] | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('replayed_at', hub.store.models.UTCDateTime(timezone=True), nullable=True))
        batch_op.create_index('ix_events_reason_received_at_id', ['reason', 'received_at', 'id'], unique=False)
        batch_op.drop_index('ix_events_request_id')
        batch_op.create_index('ix_events_request_id_received_at_id', ['request_id', 'received_at', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_request_id_received_at_id')
        batch_op.create_index('ix_events_request_id', ['request_id'], unique=False)
        batch_op.drop_index('ix_events_reason_received_at_id')
        batch_op.drop_column('replayed_at')
