"""alert channels, rules, alerts and what was sent, and the evaluator's state row

Five new tables: alert_channels (where alerts go), alert_rules (when to alert), alerts (one
row per condition while it lasts and after), alert_sends (each message and whether it
arrived) and alert_state (one row: the evaluator's turn and cursors). Deliveries get a
partial index by completed_at (the ended ones) so that the evaluator's counts of dead
deliveries and failure ratios read one small range.

No rule row is written: the built-in rules (dead deliveries, open circuits) apply while no
row replaces them. The downgrade drops the tables and the index; nothing else is touched.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0015'
down_revision: str | Sequence[str] | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ENDED = "completed_at IS NOT NULL"
FIRING = "state = 'firing'"
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
BIGID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table(
        'alert_channels',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('config', JSON, nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_alert_channels')),
        sa.UniqueConstraint('name', name=op.f('uq_alert_channels_name')),
    )
    op.create_table(
        'alert_rules',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('route', sa.String(length=64), nullable=True),
        sa.Column('destination', sa.String(length=64), nullable=True),
        sa.Column('threshold', sa.Double(), nullable=True),
        sa.Column('window', sa.Integer(), nullable=True),
        sa.Column('channels', JSON, nullable=False),
        sa.Column('enabled', sa.Boolean(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_alert_rules')),
        sa.UniqueConstraint('name', name=op.f('uq_alert_rules_name')),
    )
    op.create_table(
        'alerts',
        sa.Column('id', BIGID, autoincrement=True, nullable=False),
        sa.Column('rule', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('subject', sa.String(length=200), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('count', sa.BigInteger(), nullable=False),
        sa.Column('value', sa.Double(), nullable=True),
        sa.Column('message', sa.Text(), nullable=True),
        sa.Column('opened_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_alerts')),
    )
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.create_index('ix_alerts_firing', ['rule', 'subject'], unique=True,
                              postgresql_where=sa.text(FIRING), sqlite_where=sa.text(FIRING))
        batch_op.create_index('ix_alerts_opened_at', ['opened_at'], unique=False)
    op.create_table(
        'alert_sends',
        sa.Column('id', BIGID, autoincrement=True, nullable=False),
        sa.Column('alert_id', BIGID, nullable=True),
        sa.Column('channel', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['alert_id'], ['alerts.id'],
                                name=op.f('fk_alert_sends_alert_id_alerts'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_alert_sends')),
    )
    with op.batch_alter_table('alert_sends', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alert_sends_alert_id'), ['alert_id'], unique=False)
        batch_op.create_index('ix_alert_sends_status_id', ['status', 'id'], unique=False)
    op.create_table(
        'alert_state',
        sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('next_run_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('ran_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('ran_by', sa.String(length=64), nullable=True),
        sa.Column('change_cursor', sa.BigInteger(), nullable=False),
        sa.Column('dead_cursor', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_alert_state')),
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_deliveries_ended_at', ['completed_at'], unique=False,
                              postgresql_where=sa.text(ENDED), sqlite_where=sa.text(ENDED))


def downgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_deliveries_ended_at', postgresql_where=sa.text(ENDED),
                            sqlite_where=sa.text(ENDED))
    op.drop_table('alert_state')
    op.drop_table('alert_sends')
    op.drop_table('alerts')
    op.drop_table('alert_rules')
    op.drop_table('alert_channels')
