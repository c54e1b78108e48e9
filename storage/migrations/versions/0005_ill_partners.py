"""Interlibrary loan with partner libraries over ISO 18626 (#22): the partners asked for each request
(the rota), the durable queue of outgoing messages, the incoming messages already processed, and the
partners' lending requests.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

import storage.db

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ill_lending_requests',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('agency_id', sa.String(length=128), nullable=False),
    sa.Column('their_request_id', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('title', sa.Text(), nullable=False),
    sa.Column('author', sa.Text(), nullable=False),
    sa.Column('component', sa.Text(), nullable=False),
    sa.Column('pages', sa.String(length=64), nullable=False),
    sa.Column('identifier', sa.String(length=300), nullable=False),
    sa.Column('need_before', sa.Date(), nullable=True),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=False),
    sa.Column('handled_by', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('received_at', storage.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('answered_at', storage.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('shipped_at', storage.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('closed_at', storage.db.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('agency_id', 'their_request_id', name='uq_ill_lending_requests_their_id')
    )
    op.create_index(op.f('ix_ill_lending_requests_agency_id'), 'ill_lending_requests', ['agency_id'], unique=False)
    op.create_index(op.f('ix_ill_lending_requests_state'), 'ill_lending_requests', ['state'], unique=False)
    op.create_table('ill_partner_inbox',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('received_at', storage.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('answer', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('ill_partner_messages',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('agency_id', sa.String(length=128), nullable=False),
    sa.Column('conversation', sa.String(length=300), nullable=False),
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('summary', sa.String(length=64), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('dedupe_key', sa.String(length=300), nullable=False),
    sa.Column('state', sa.String(length=8), nullable=False),
    sa.Column('attempts', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('next_attempt_at', storage.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('lease_until', storage.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', storage.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('sent_at', storage.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.String(length=300), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('dedupe_key')
    )
    op.create_index(op.f('ix_ill_partner_messages_agency_id'), 'ill_partner_messages', ['agency_id'], unique=False)
    op.create_index(op.f('ix_ill_partner_messages_conversation'), 'ill_partner_messages', ['conversation'], unique=False)
    op.create_index(op.f('ix_ill_partner_messages_state'), 'ill_partner_messages', ['state'], unique=False)
    op.create_table('ill_partner_attempts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('request_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('agency_id', sa.String(length=128), nullable=False),
    sa.Column('position', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('partner_status', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.String(length=300), nullable=False),
    sa.Column('asked_at', storage.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('answered_at', storage.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('shipped_at', storage.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('cancel_asked_at', storage.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('closed_at', storage.db.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['request_id'], ['ill_requests.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('request_id', 'agency_id', name='uq_ill_partner_attempts_request_agency')
    )
    op.create_index(op.f('ix_ill_partner_attempts_agency_id'), 'ill_partner_attempts', ['agency_id'], unique=False)
    op.create_index(op.f('ix_ill_partner_attempts_request_id'), 'ill_partner_attempts', ['request_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_ill_partner_attempts_request_id'), table_name='ill_partner_attempts')
    op.drop_index(op.f('ix_ill_partner_attempts_agency_id'), table_name='ill_partner_attempts')
    op.drop_table('ill_partner_attempts')
    op.drop_index(op.f('ix_ill_partner_messages_state'), table_name='ill_partner_messages')
    op.drop_index(op.f('ix_ill_partner_messages_conversation'), table_name='ill_partner_messages')
    op.drop_index(op.f('ix_ill_partner_messages_agency_id'), table_name='ill_partner_messages')
    op.drop_table('ill_partner_messages')
    op.drop_table('ill_partner_inbox')
    op.drop_index(op.f('ix_ill_lending_requests_state'), table_name='ill_lending_requests')
    op.drop_index(op.f('ix_ill_lending_requests_agency_id'), table_name='ill_lending_requests')
    op.drop_table('ill_lending_requests')
