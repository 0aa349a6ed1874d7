"""events keep their request id

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 10:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | Sequence[str] | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: events received before this revision have no request id.
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('request_id', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_column('request_id')
