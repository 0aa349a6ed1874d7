"""the four tables: api_keys, routes, events, attempts

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 19:15:03.860168
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql
import hub.store.models

revision: str = '0001'
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('scopes', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', hub.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', hub.store.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', hub.store.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', hub.store.models.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('prefix', name=op.f('uq_api_keys_prefix'))
    )
    op.create_table('events',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('route', sa.String(length=200), nullable=False),
    sa.Column('key_prefix', sa.String(length=16), nullable=True),
    sa.Column('remote_addr', sa.String(length=64), nullable=True),
    sa.Column('method', sa.String(length=10), nullable=False),
    sa.Column('path', sa.String(length=2000), nullable=False),
    sa.Column('query', sa.Text(), nullable=True),
    sa.Column('received_at', hub.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('headers', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('content_type', sa.String(length=200), nullable=True),
    sa.Column('body', sa.LargeBinary(), nullable=True),
    sa.Column('dedup_key', sa.String(length=300), nullable=True),
    sa.Column('duplicate_of', sa.String(length=32), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=True),
    sa.Column('response_status', sa.Integer(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', hub.store.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('lease_until', hub.store.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('result', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('completed_at', hub.store.models.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events'))
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_dedup', ['route', 'dedup_key'], unique=False)
        batch_op.create_index('ix_events_due', ['status', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_received_at'), ['received_at'], unique=False)

    op.create_table('routes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('mode', sa.String(length=8), nullable=False),
    sa.Column('steps', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('filter', sa.Text(), nullable=True),
    sa.Column('auth', sa.String(length=20), nullable=False),
    sa.Column('verify_scheme', sa.String(length=32), nullable=True),
    sa.Column('verify_options', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('secrets_encrypted', sa.Text(), nullable=True),
    sa.Column('dedup_path', sa.String(length=200), nullable=True),
    sa.Column('dedup_window', sa.Integer(), nullable=False),
    sa.Column('retry_schedule', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('rate_limit', sa.String(length=32), nullable=True),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('created_at', hub.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', hub.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_routes')),
    sa.UniqueConstraint('name', name=op.f('uq_routes_name'))
    )
    op.create_table('attempts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('event_id', sa.String(length=32), nullable=False),
    sa.Column('run', sa.Integer(), nullable=False),
    sa.Column('step_index', sa.Integer(), nullable=False),
    sa.Column('connector', sa.String(length=64), nullable=False),
    sa.Column('try_number', sa.Integer(), nullable=False),
    sa.Column('started_at', hub.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('duration_ms', sa.Integer(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('http_status', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('request', sa.Text(), nullable=True),
    sa.Column('response', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['event_id'], ['events.id'], name=op.f('fk_attempts_event_id_events'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_attempts'))
    )
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_attempts_event_id'), ['event_id'], unique=False)

    


def downgrade() -> None:
    
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_attempts_event_id'))

    op.drop_table('attempts')
    op.drop_table('routes')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_received_at'))
        batch_op.drop_index('ix_events_due')
        batch_op.drop_index('ix_events_dedup')

    op.drop_table('events')
    op.drop_table('api_keys')
    
