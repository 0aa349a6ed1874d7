"""rate limits: per-key limit and the shared rate_counters table

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 19:24:09.793733
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import hub.store.models

revision: str = '0003'
down_revision: str | Sequence[str] | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('rate_counters',
    sa.Column('bucket', sa.String(length=200), nullable=False),
    sa.Column('window_start', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('expires_at', hub.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('bucket', 'window_start', name=op.f('pk_rate_counters'))
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rate_limit', sa.String(length=32), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('rate_limit')

    op.drop_table('rate_counters')
