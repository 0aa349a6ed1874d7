"""retention per route, dedup keys that outlive their events, the purge's state row

Routes get ``retention_days`` (NULL: the hub's default, HUB_RETENTION_DAYS), so every existing
route keeps what the default keeps. Two new tables: dedup_keys (the dedup key of each event
purged while its route's dedup window was open, until that window closes) and
retention_state (one row: when the workers' next purge pass is due, and the lease of the
process running it). No row is written: the first pass makes the state row.

The downgrade drops both tables and the column. The dedup keys of purged events go with
them: a sender's retry of such a delivery, inside its window, is then taken as new.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0020'
down_revision: str | Sequence[str] | None = '0019'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column with no default: PostgreSQL writes no row, SQLite keeps the table.
    op.add_column('routes', sa.Column('retention_days', sa.Integer(), nullable=True))
    op.create_table(
        'dedup_keys',
        sa.Column('event_id', sa.String(length=32), nullable=False),
        sa.Column('route', sa.String(length=200), nullable=False),
        sa.Column('key_prefix', sa.String(length=16), nullable=True),
        sa.Column('dedup_key', sa.String(length=300), nullable=False),
        sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('event_id', name=op.f('pk_dedup_keys')),
    )
    with op.batch_alter_table('dedup_keys', schema=None) as batch_op:
        batch_op.create_index('ix_dedup_keys_route_dedup_key', ['route', 'dedup_key'])
        batch_op.create_index('ix_dedup_keys_expires_at', ['expires_at'])
    op.create_table(
        'retention_state',
        sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('next_run_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('lease_owner', sa.String(length=64), nullable=True),
        sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('ran_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('ran_by', sa.String(length=64), nullable=True),
        sa.Column('purged', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_retention_state')),
    )


def downgrade() -> None:
    op.drop_table('retention_state')
    op.drop_table('dedup_keys')
    # DROP COLUMN in place (SQLite 3.35 and later): a batch copy is not needed.
    op.execute('ALTER TABLE routes DROP COLUMN retention_days')
