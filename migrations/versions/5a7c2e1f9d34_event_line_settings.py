"""the event's line: [event.line] enabled, max_rate, pre_queue_minutes

Revision ID: 5a7c2e1f9d34
Revises: 8e4f2a6c1b93
Create Date: 2026-12-06 20:30:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '5a7c2e1f9d34'
down_revision = '8e4f2a6c1b93'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('line_enabled', sa.Boolean(), server_default=sa.true(), nullable=False))
        batch_op.add_column(sa.Column('line_max_rate', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('line_pre_queue_minutes', sa.Integer(), server_default='15', nullable=False))


def downgrade():
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_column('line_pre_queue_minutes')
        batch_op.drop_column('line_max_rate')
        batch_op.drop_column('line_enabled')
