"""destinations and deliveries: a route fans out, each destination delivered on its own

A route gets `destinations` (its own steps, filter, retry schedule, and settings for the
delivery controls, off by default), and each accepted event one row in `deliveries` per
destination: what workers claim, retry and end. Attempts belong to a delivery.

The data is carried over, nothing lost: each route becomes one destination named "default"
(its steps, filter and retry schedule), and each accepted event (every status but rejected
and duplicate) one delivery with the event's delivery columns (status, runs, retries, next
attempt, lease, result, error, completion); its attempts get that delivery. A delivery's id
is the event's with `dlv_` for `evt_`. The events keep their columns, now the roll-up of
their deliveries.

Downgrade drops the two tables and attempts.delivery_id; it refuses while a route has more
than one destination (those would be lost: remove them first).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 21:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import hub.store.models

revision: str = '0011'
down_revision: str | Sequence[str] | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DUE = "status IN ('pending', 'retrying')"
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
UTC = hub.store.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table('destinations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('route_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('steps', JSON, nullable=False),
    sa.Column('filter', sa.Text(), nullable=True),
    sa.Column('retry_schedule', JSON, nullable=True),
    sa.Column('max_in_flight', sa.Integer(), nullable=True),
    sa.Column('rate', sa.String(length=32), nullable=True),
    sa.Column('ordering_key', sa.Text(), nullable=True),
    sa.Column('breaker', JSON, nullable=True),
    sa.Column('state', sa.String(length=16), server_default='active', nullable=False),
    sa.Column('state_changed_at', UTC, nullable=True),
    sa.Column('state_reason', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['route_id'], ['routes.id'], name=op.f('fk_destinations_route_id_routes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_destinations')),
    sa.UniqueConstraint('route_id', 'name', name='uq_destinations_route_id_name')
    )
    with op.batch_alter_table('destinations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_destinations_route_id'), ['route_id'], unique=False)

    op.create_table('deliveries',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('event_id', sa.String(length=32), nullable=False),
    sa.Column('route', sa.String(length=200), nullable=False),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('retries', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', UTC, nullable=True),
    sa.Column('lease_until', UTC, nullable=True),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('result', JSON, nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('completed_at', UTC, nullable=True),
    sa.Column('created_at', UTC, nullable=False),
    sa.ForeignKeyConstraint(['event_id'], ['events.id'], name=op.f('fk_deliveries_event_id_events'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deliveries'))
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deliveries_event_id'), ['event_id'], unique=False)
        batch_op.create_index('ix_deliveries_due_at', ['next_attempt_at'], unique=False,
                              postgresql_where=sa.text(DUE), sqlite_where=sa.text(DUE))
        batch_op.create_index('ix_deliveries_due_by_route', ['route', 'next_attempt_at'], unique=False,
                              postgresql_where=sa.text(DUE), sqlite_where=sa.text(DUE))

    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('delivery_id', sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f('ix_attempts_delivery_id'), ['delivery_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_attempts_delivery_id_deliveries'), 'deliveries', ['delivery_id'], ['id'], ondelete='CASCADE')

    # Each route: one destination, "default", with the route's steps, filter and schedule.
    op.execute(
        "INSERT INTO destinations (route_id, name, position, steps, filter, retry_schedule, state)"
        " SELECT id, 'default', 0, steps, filter, retry_schedule, 'active' FROM routes"
    )
    # Each accepted event: one delivery to it, carrying the event's delivery columns.
    op.execute(
        "INSERT INTO deliveries (id, event_id, route, destination, position, status,"
        " attempts, retries, next_attempt_at, lease_until, lease_owner, result, last_error,"
        " completed_at, created_at)"
        " SELECT 'dlv_' || substr(e.id, 5), e.id, e.route, 'default', 0, e.status,"
        " e.attempts, e.retries, e.next_attempt_at, e.lease_until, e.lease_owner, e.result,"
        " e.last_error, e.completed_at, e.received_at"
        " FROM events e"
        " WHERE e.status NOT IN ('rejected', 'duplicate')"
    )
    op.execute(
        "UPDATE attempts SET delivery_id = 'dlv_' || substr(event_id, 5)"
        " WHERE EXISTS (SELECT 1 FROM deliveries d WHERE d.id = 'dlv_' || substr(attempts.event_id, 5))"
    )


def downgrade() -> None:
    several = op.get_bind().execute(sa.text(
        "SELECT r.name FROM routes r JOIN destinations d ON d.route_id = r.id"
        " GROUP BY r.name HAVING count(*) > 1 ORDER BY r.name"
    )).scalars().all()
    if several:
        raise RuntimeError(
            "cannot downgrade below 0011: these routes have more than one destination, which"
            " the older schema cannot hold (remove the extra destinations first): "
            + ", ".join(several[:20])
        )
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_attempts_delivery_id_deliveries'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_attempts_delivery_id'))
        batch_op.drop_column('delivery_id')
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_deliveries_due_by_route', postgresql_where=sa.text(DUE), sqlite_where=sa.text(DUE))
        batch_op.drop_index('ix_deliveries_due_at', postgresql_where=sa.text(DUE), sqlite_where=sa.text(DUE))
        batch_op.drop_index(batch_op.f('ix_deliveries_event_id'))
    op.drop_table('deliveries')
    with op.batch_alter_table('destinations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_destinations_route_id'))
    op.drop_table('destinations')
