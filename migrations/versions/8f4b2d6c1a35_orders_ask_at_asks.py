"""orders: ask_at and asks, so that an order whose callback never came is asked about once (issue 24)

Revision ID: 8f4b2d6c1a35
Revises: 3c1d7e9a2b4f
Create Date: 2026-12-06 20:40:00

`ask_at`: when PayHero's transaction-status is next due to be asked about the order (set when
PayHero takes the STK push; null: never).  `asks`: how many times it was.  The index on
(status, ask_at) makes the workers' look for due orders one short range scan of pending ones.
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '8f4b2d6c1a35'
down_revision = '3c1d7e9a2b4f'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ask_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('asks', sa.Integer(), server_default=sa.text('0'), nullable=False))
        batch_op.create_index('ix_orders_status_ask_at', ['status', 'ask_at'], unique=False)


def downgrade():
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.drop_index('ix_orders_status_ask_at')
        batch_op.drop_column('asks')
        batch_op.drop_column('ask_at')
