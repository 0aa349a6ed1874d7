"""events.retries: position in the retry schedule since the last queueing

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 19:24:43.804674
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import hub.store.models

revision: str = '0002'
down_revision: str | Sequence[str] | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('retries', sa.Integer(), server_default='0', nullable=False))

    


def downgrade() -> None:
    
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_column('retries')

    
