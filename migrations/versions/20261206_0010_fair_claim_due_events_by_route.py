"""fair claim: due events by route

Workers take due events in turns across routes (hub.services.delivery.fair_pick): one route's backlog
or slow receiver no longer holds back the others. The claim jumps from one route's oldest
due event to the next route's along a partial index on (route, next_attempt_at) over
pending and retrying rows, an index probe a route, instead of reading every waiting event.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 18:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | Sequence[str] | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DUE = "status IN ('pending', 'retrying')"


def upgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(
            'ix_events_due_by_route',
            ['route', 'next_attempt_at'],
            unique=False,
            postgresql_where=sa.text(DUE),
            sqlite_where=sa.text(DUE),
        )


def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_due_by_route')
