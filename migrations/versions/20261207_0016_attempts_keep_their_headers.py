"""attempts keep the headers sent and answered

The event page shows each attempt as HTTP reads; the answer's headers were not kept, and the
request's sat inside its copy, lost with it when a long body cut the copy short. Two JSON
columns hold them as [name, value] pairs, redacted and capped. Existing attempts have none
(NULL): the page says "not recorded".

The downgrade drops both columns (the headers with them); every row stays.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0016'
down_revision: str | Sequence[str] | None = '0015'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HEADERS = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    # Plain ADD COLUMNs on both databases: nullable with no default, so PostgreSQL writes no
    # row, and SQLite keeps the table (no batch copy).
    op.add_column('attempts', sa.Column('request_headers', HEADERS, nullable=True))
    op.add_column('attempts', sa.Column('response_headers', HEADERS, nullable=True))


def downgrade() -> None:
    # DROP COLUMN in place (SQLite 3.35 and later): a batch copy is not needed.
    op.execute('ALTER TABLE attempts DROP COLUMN response_headers')
    op.execute('ALTER TABLE attempts DROP COLUMN request_headers')
