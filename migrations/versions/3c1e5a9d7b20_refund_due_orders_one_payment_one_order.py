"""orders: refund_due and refund_reference; a PayHero reference and an M-Pesa receipt pay for one order at most

Revision ID: 3c1e5a9d7b20
Revises: b7e2c4a91d03
Create Date: 2026-12-01 23:40:00

Written by hand (issue 17).  The unique indexes assume no two orders share a
receipt or a reference today: nothing before this revision ever gave one
payment to two orders (a final order was never changed by a later callback).
"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '3c1e5a9d7b20'
down_revision = 'b7e2c4a91d03'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.add_column(sa.Column('refund_due', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('refund_reference', sa.String(length=100), nullable=True))
        batch_op.drop_index(batch_op.f('ix_orders_payhero_reference'))
        batch_op.create_index(batch_op.f('ix_orders_payhero_reference'), ['payhero_reference'], unique=True)
        batch_op.create_index(batch_op.f('ix_orders_receipt'), ['receipt'], unique=True)


def downgrade():
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_orders_receipt'))
        batch_op.drop_index(batch_op.f('ix_orders_payhero_reference'))
        batch_op.create_index(batch_op.f('ix_orders_payhero_reference'), ['payhero_reference'], unique=False)
        batch_op.drop_column('refund_reference')
        batch_op.drop_column('refund_due')
