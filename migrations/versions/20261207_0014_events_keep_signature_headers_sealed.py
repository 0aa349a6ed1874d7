"""events keep the provider's signature headers sealed, for `hub listen`

An accepted signed request's signature headers are redacted in `events.headers`; a local
app behind `hub listen` needs them to check the provider's signature itself. The new column
holds them as one SecretBox token (opened only for the listen stream). Existing events have
none: they are forwarded without their signature headers.

The downgrade drops the column (the sealed headers with it); every row stays.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0014'
down_revision: str | Sequence[str] | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN on both databases: SQLite keeps the table (a batch copy of events
    # would take the deliveries and attempts with it, ON DELETE CASCADE).
    op.add_column('events', sa.Column('sealed_headers', sa.Text(), nullable=True))


def downgrade() -> None:
    # DROP COLUMN in place (SQLite 3.35 and later), for the same reason.
    op.execute('ALTER TABLE events DROP COLUMN sealed_headers')
