"""events keep the traceparent of the request that brought them

With HUB_OTEL=true a webhook is traced from its request to each destination's call; the
request's span ends with the 202, and the worker's claim and delivery spans join its trace
through the W3C traceparent kept with the event. A nullable column: NULL when tracing is
off, and for every event written before it.

The downgrade drops the column (the stored trace contexts with it); every row stays.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0019'
down_revision: str | Sequence[str] | None = '0018'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN on both databases: nullable with no default, so PostgreSQL writes no
    # row, and SQLite keeps the table (no batch copy).
    op.add_column('events', sa.Column('traceparent', sa.String(length=55), nullable=True))


def downgrade() -> None:
    # DROP COLUMN in place (SQLite 3.35 and later): a batch copy is not needed.
    op.execute('ALTER TABLE events DROP COLUMN traceparent')
