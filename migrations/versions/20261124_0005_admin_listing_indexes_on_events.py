"""admin listing indexes on events

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 06:38:10.042206
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import hub.store.models

revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_received_at'))
        batch_op.create_index('ix_events_key_prefix_received_at_id', ['key_prefix', 'received_at', 'id'], unique=False)
        batch_op.create_index('ix_events_received_at_id', ['received_at', 'id'], unique=False)
        batch_op.create_index('ix_events_route_received_at_id', ['route', 'received_at', 'id'], unique=False)
        batch_op.create_index('ix_events_status_received_at_id', ['status', 'received_at', 'id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_status_received_at_id')
        batch_op.drop_index('ix_events_route_received_at_id')
        batch_op.drop_index('ix_events_received_at_id')
        batch_op.drop_index('ix_events_key_prefix_received_at_id')
        batch_op.create_index(batch_op.f('ix_events_received_at'), ['received_at'], unique=False)

