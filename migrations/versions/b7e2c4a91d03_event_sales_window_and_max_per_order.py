"""events: the sales window; ticket types: the most tickets one order may hold

Revision ID: b7e2c4a91d03
Revises: f6fc23f0ba53
Create Date: 2026-12-01 23:30:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'b7e2c4a91d03'
down_revision = 'f6fc23f0ba53'
branch_labels = None
depends_on = None


def upgrade():
    # Existing events stay on sale as before: no start, and sales close when the event starts.
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sales_start', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('sales_end', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('ticket_types', schema=None) as batch_op:
        batch_op.add_column(sa.Column('max_per_order', sa.Integer(), server_default='10', nullable=False))


def downgrade():
    with op.batch_alter_table('ticket_types', schema=None) as batch_op:
        batch_op.drop_column('max_per_order')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_column('sales_end')
        batch_op.drop_column('sales_start')
