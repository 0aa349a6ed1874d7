"""destination controls: lanes, ordering keys, the breaker's and the rate's state, changes

What a destination's max_in_flight, rate, ordering_key and breaker need (0011 stored the
settings; this gives them their state):

- `deliveries.lane` (route/destination): the fair claim takes turns across destinations,
  walking a partial index on (lane, next_attempt_at) of due rows, which replaces the one on
  (route, next_attempt_at). Filled from each delivery's route and destination.
- `deliveries`: an index of each lane's held deliveries, oldest first (a half-open
  circuit's probe, and the order they are let go in).
- `deliveries.order_key`: an ordered destination's key for the delivery, and an index of
  the unfinished ones by (lane, order_key, id).
- `destinations.breaker_failures`, `breaker_retry_at`, `breaker_cool_down`: the circuit
  breaker's count of consecutive failures, when an open circuit lets a probe through, and
  its next cool-down, `breaker_probe`: the held delivery a half-open circuit lets through;
  `rate_next_at`: when the rate lets the next delivery start.
- `destination_changes`: each change of a destination's state, with its cause and actor.

Nothing is lost either way: the downgrade drops the new columns and table (the settings
stay in 0011's columns).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import hub.store.models

revision: str = '0012'
down_revision: str | Sequence[str] | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DUE = "status IN ('pending', 'retrying')"
HELD = "status = 'held'"
ORDERED = (
    "order_key IS NOT NULL AND "
    "status IN ('pending', 'retrying', 'processing', 'held', 'queued')"
)
UTC = hub.store.models.UTCDateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('destination_changes',
    sa.Column('id', BIG_ID, autoincrement=True, nullable=False),
    sa.Column('route', sa.String(length=64), nullable=False),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('previous', sa.String(length=16), nullable=True),
    sa.Column('cause', sa.Text(), nullable=True),
    sa.Column('actor', sa.String(length=100), nullable=True),
    sa.Column('at', UTC, nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_destination_changes'))
    )
    with op.batch_alter_table('destination_changes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_destination_changes_at'), ['at'], unique=False)
        batch_op.create_index('ix_destination_changes_route_destination_at', ['route', 'destination', 'at'], unique=False)

    with op.batch_alter_table('destinations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('breaker_failures', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('breaker_retry_at', UTC, nullable=True))
        batch_op.add_column(sa.Column('breaker_cool_down', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('rate_next_at', UTC, nullable=True))
        batch_op.add_column(sa.Column('breaker_probe', sa.String(length=32), nullable=True))

    # Added in place, never by copying the table: on SQLite a copy drops the old table,
    # and its attempts would go with it (ON DELETE CASCADE).
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lane', sa.String(length=140), server_default='', nullable=False))
        batch_op.add_column(sa.Column('order_key', sa.String(length=200), nullable=True))
    op.execute("UPDATE deliveries SET lane = route || '/' || destination")
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_deliveries_due_by_route', postgresql_where=sa.text(DUE), sqlite_where=sa.text(DUE))
        batch_op.create_index('ix_deliveries_due_by_lane', ['lane', 'next_attempt_at'], unique=False,
                              postgresql_where=sa.text(DUE), sqlite_where=sa.text(DUE))
        batch_op.create_index('ix_deliveries_held_by_lane', ['lane', 'next_attempt_at', 'id'], unique=False,
                              postgresql_where=sa.text(HELD), sqlite_where=sa.text(HELD))
        batch_op.create_index('ix_deliveries_order', ['lane', 'order_key', 'id'], unique=False,
                              postgresql_where=sa.text(ORDERED), sqlite_where=sa.text(ORDERED))


def downgrade() -> None:
    # A delivery waiting for the one before it in its key would wait forever without the
    # key: it is pending again (due now, in its order), as an unordered destination's is.
    op.execute("UPDATE deliveries SET status = 'pending' WHERE status = 'queued'")
    op.execute("UPDATE events SET status = 'pending' WHERE status = 'queued'")
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_deliveries_held_by_lane', postgresql_where=sa.text(HELD), sqlite_where=sa.text(HELD))
        batch_op.drop_index('ix_deliveries_order', postgresql_where=sa.text(ORDERED), sqlite_where=sa.text(ORDERED))
        batch_op.drop_index('ix_deliveries_due_by_lane', postgresql_where=sa.text(DUE), sqlite_where=sa.text(DUE))
        batch_op.create_index('ix_deliveries_due_by_route', ['route', 'next_attempt_at'], unique=False,
                              postgresql_where=sa.text(DUE), sqlite_where=sa.text(DUE))
    # Dropped in place (SQLite 3.35+), never by copying the table (see the upgrade).
    op.drop_column('deliveries', 'order_key')
    op.drop_column('deliveries', 'lane')
    with op.batch_alter_table('destinations', schema=None) as batch_op:
        batch_op.drop_column('breaker_probe')
        batch_op.drop_column('rate_next_at')
        batch_op.drop_column('breaker_cool_down')
        batch_op.drop_column('breaker_retry_at')
        batch_op.drop_column('breaker_failures')
    with op.batch_alter_table('destination_changes', schema=None) as batch_op:
        batch_op.drop_index('ix_destination_changes_route_destination_at')
        batch_op.drop_index(batch_op.f('ix_destination_changes_at'))
    op.drop_table('destination_changes')
