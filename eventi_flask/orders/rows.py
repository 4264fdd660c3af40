"""Orders as rows: the SQL of the hot paths, a callback and a wait's read.

These use SQLAlchemy Core rather than the ORM, with every statement built once
here and given its values as parameters at execution: no unit of work, no
identity map, no per-call statement building or cache-key hashing.  That took
a callback from 12 round trips and 5.5 ms of CPU to 7 and 2.6 ms
(scripts/bench_callback.py; BENCHMARKS.md).
Creating orders and the rarer changes stay in the ORM (service.py).

A row is a mapping of the orders table's columns plus `ticket_type_code` and
`event_slug`: what schemas.order_body() needs to answer.
"""
from sqlalchemy import bindparam, insert, select, update

from .models import Event, Order, Ticket, TicketType

ORDERS, TICKETS, TICKET_TYPES = Order.__table__, Ticket.__table__, TicketType.__table__

_ORDER_ROW = (
    select(ORDERS, TICKET_TYPES.c.code.label("ticket_type_code"), Event.__table__.c.slug.label("event_slug"))
    .join_from(ORDERS, TICKET_TYPES)
    .join(Event.__table__)
)
# How an order is named: our id, or (in a payment result) PayHero's two references.
_FIND_BY = {
    column.key: _ORDER_ROW.where(column == bindparam("key"))
    for column in (ORDERS.c.id, ORDERS.c.checkout_request_id, ORDERS.c.payhero_reference)
}
_LOCK_BY = {key: statement.with_for_update(of=ORDERS) for key, statement in _FIND_BY.items()}
_TICKET_CODES = select(TICKETS.c.code).where(TICKETS.c.order_id == bindparam("order_id")).order_by(TICKETS.c.id)
# Compare-and-set on the version: PostgreSQL's row lock already makes it hold; SQLite has no
# row locks (and pysqlite reads outside any transaction), so there a writer that got there
# first is noticed here instead of overwritten.
_UPDATE_ORDER = update(ORDERS).where(ORDERS.c.id == bindparam("order_id"),
                                     ORDERS.c.version == bindparam("read_version"))
_INSERT_TICKET = insert(TICKETS)
# In SQL, not in Python: concurrent failures on one ticket type must not overwrite each other.
_RELEASE_TICKETS = (update(TICKET_TYPES).where(TICKET_TYPES.c.id == bindparam("ticket_type_id"))
                    .values(reserved=TICKET_TYPES.c.reserved - bindparam("quantity")))


def read(connection, order_id):
    return connection.execute(_FIND_BY["id"], {"key": order_id}).mappings().first()


def find_for_payment(connection, keys, lock):
    """The first order matching one of `keys`, (column name, value) pairs tried in order; locked if `lock`."""
    statements = _LOCK_BY if lock else _FIND_BY
    for column, value in keys:
        if value:
            row = connection.execute(statements[column], {"key": value}).mappings().first()
            if row is not None:
                return row
    return None


def ticket_codes(connection, order_id):
    return connection.execute(_TICKET_CODES, {"order_id": order_id}).scalars().all()


def update_order(connection, row, changes):
    """Write `changes` to the order read as `row`; False if it changed since it was read."""
    result = connection.execute(_UPDATE_ORDER, {"order_id": row["id"], "read_version": row["version"], **changes})
    return result.rowcount == 1


def add_tickets(connection, order_id, codes):
    connection.execute(_INSERT_TICKET, [{"order_id": order_id, "code": code} for code in codes])


def release_tickets(connection, ticket_type_id, quantity):
    connection.execute(_RELEASE_TICKETS, {"ticket_type_id": ticket_type_id, "quantity": quantity})
