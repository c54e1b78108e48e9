"""Service quality (#18): satisfaction surveys (invitation flags per person; anonymous responses and
answers keyed by a random token), the last day each person used the bot, and the names of staff
members kept for the quality report after they leave the staff list.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

import storage.db

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BIG = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('surveys',
    sa.Column('id', BIG, nullable=False),
    sa.Column('code', sa.String(length=64), nullable=False),
    sa.Column('title_zh', sa.String(length=200), nullable=False),
    sa.Column('title_en', sa.String(length=200), nullable=False),
    sa.Column('intro_zh', sa.Text(), nullable=False),
    sa.Column('intro_en', sa.Text(), nullable=False),
    sa.Column('questions', sa.JSON(), nullable=False),
    sa.Column('closes_on', sa.Date(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', storage.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('code')
    )
    op.create_table('survey_invitations',
    sa.Column('survey_id', BIG, nullable=False),
    sa.Column('telegram_id', BIG, autoincrement=False, nullable=False),
    sa.Column('invited_on', sa.Date(), nullable=False),
    sa.Column('reminded', sa.Boolean(), nullable=False),
    sa.Column('started', sa.Boolean(), nullable=False),
    sa.Column('finished', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['survey_id'], ['surveys.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('survey_id', 'telegram_id')
    )
    op.create_table('survey_responses',
    sa.Column('token', sa.String(length=32), nullable=False),
    sa.Column('survey_id', BIG, nullable=False),
    sa.Column('started_on', sa.Date(), nullable=False),
    sa.Column('finished', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['survey_id'], ['surveys.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('token')
    )
    with op.batch_alter_table('survey_responses', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_survey_responses_survey_id'), ['survey_id'], unique=False)
    op.create_table('survey_answers',
    sa.Column('token', sa.String(length=32), nullable=False),
    sa.Column('question', BIG, autoincrement=False, nullable=False),
    sa.Column('part', sa.String(length=8), nullable=False),
    sa.Column('value', BIG, nullable=True),
    sa.Column('text', sa.Text(), nullable=True),
    sa.Column('answered_on', sa.Date(), nullable=False),
    sa.ForeignKeyConstraint(['token'], ['survey_responses.token'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('token', 'question', 'part')
    )
    with op.batch_alter_table('survey_answers', schema=None) as batch_op:
        batch_op.create_index('ix_survey_answers_question', ['question', 'part'], unique=False)
    op.create_table('user_activity',
    sa.Column('telegram_id', BIG, autoincrement=False, nullable=False),
    sa.Column('last_seen_on', sa.Date(), nullable=False),
    sa.PrimaryKeyConstraint('telegram_id')
    )
    with op.batch_alter_table('user_activity', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_user_activity_last_seen_on'), ['last_seen_on'], unique=False)
    op.create_table('staff_history',
    sa.Column('telegram_id', BIG, autoincrement=False, nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('updated_at', storage.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('telegram_id')
    )


def downgrade() -> None:
    op.drop_table('staff_history')
    op.drop_table('user_activity')
    op.drop_table('survey_answers')
    op.drop_table('survey_responses')
    op.drop_table('survey_invitations')
    op.drop_table('surveys')
