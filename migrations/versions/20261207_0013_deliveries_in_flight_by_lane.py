"""deliveries in flight by lane: what a claim counts against a destination's max_in_flight

A claim of a destination with `max_in_flight` counts its deliveries being called (status
`processing`, lease not run out). Without an index that count read every delivery the hub
still keeps, delivered ones included; this partial index holds only the rows in flight, by
(lane, lease_until), so the count is one small range.

Nothing is lost either way: the downgrade drops the index.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | Sequence[str] | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

IN_FLIGHT = "status = 'processing'"


def upgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_deliveries_in_flight', ['lane', 'lease_until'], unique=False,
                              postgresql_where=sa.text(IN_FLIGHT), sqlite_where=sa.text(IN_FLIGHT))


def downgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_deliveries_in_flight', postgresql_where=sa.text(IN_FLIGHT),
                            sqlite_where=sa.text(IN_FLIGHT))
