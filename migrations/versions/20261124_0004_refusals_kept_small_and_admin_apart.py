"""refusals kept small and admin apart: events.body_size and presented_prefix, api_keys.is_admin

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 06:40:00.000000

Keys whose scopes held "admin" become admin keys and lose that scope, so "admin" is free to
name a route. A key left with no scope keeps what "admin" gave it: every route ("*").
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import hub.store.models

revision: str = '0004'
down_revision: str | Sequence[str] | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

api_keys = sa.table(
    'api_keys',
    sa.column('id', sa.Integer()),
    sa.column('scopes', hub.store.models.JSONType),
    sa.column('is_admin', sa.Boolean()),
)


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('is_admin', sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('presented_prefix', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('body_size', sa.BigInteger(), nullable=True))

    conn = op.get_bind()
    for key_id, scopes in conn.execute(sa.select(api_keys.c.id, api_keys.c.scopes)).all():
        if 'admin' not in (scopes or []):
            continue
        rest = [s for s in scopes if s != 'admin'] or ['*']
        conn.execute(
            api_keys.update()
            .where(api_keys.c.id == key_id)
            .values(is_admin=True, scopes=rest)
        )


def downgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(api_keys.c.id, api_keys.c.scopes).where(api_keys.c.is_admin.is_(True))
    ).all()
    for key_id, scopes in rows:
        conn.execute(
            api_keys.update()
            .where(api_keys.c.id == key_id)
            .values(scopes=['admin', *[s for s in scopes or [] if s != 'admin']])
        )

    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_column('body_size')
        batch_op.drop_column('presented_prefix')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('is_admin')
