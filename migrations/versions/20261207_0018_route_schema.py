"""routes may hold a JSON Schema their payloads must match

A route's optional ``schema`` (a JSON Schema object): a payload that does not match is
refused 422 before it is stored as an event. Existing routes have none (NULL) and take any
payload, as before.

The downgrade drops the column (the schemas with it); every route stays, and takes any
payload again.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0018'
down_revision: str | Sequence[str] | None = '0017'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    # A plain ADD COLUMN on both databases: nullable with no default, so PostgreSQL writes
    # no row, and SQLite keeps the table (no batch copy).
    op.add_column('routes', sa.Column('schema', SCHEMA, nullable=True))


def downgrade() -> None:
    # DROP COLUMN in place (SQLite 3.35 and later): a batch copy is not needed.
    op.execute('ALTER TABLE routes DROP COLUMN schema')
