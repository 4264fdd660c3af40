"""Orders as rows: the SQL of the hot paths: creating an order, a callback and a wait's read.

These use SQLAlchemy Core rather than the ORM, with every statement built once
here and given its values as parameters at execution: no unit of work, no
identity map, no per-call statement building or cache-key hashing.  That took
a callback from 12 round trips and 5.5 ms of CPU to 7 and 2.6 ms
(docs/benchmarks-history.md); on PostgreSQL its writes are now one
statement (change_order), sent with its COMMIT, so a paid callback is 2 round trips:
BEGIN with the locking read, that statement with COMMIT, each pair as one query.
Creating an order is one statement that reserves the tickets and inserts the
order (see create_order for why).  The rarer changes stay in the ORM (service.py).
On PostgreSQL an order's two statements, each its own transaction, go straight
to psycopg on a pooled connection (run_alone): SQLAlchemy's Session and
execution context around them were a fifth of an order's CPU (BENCHMARKS.md).

A row is a mapping of the orders table's columns plus `ticket_type_code` and
`event_slug`: what schemas.order_body() needs to answer.
"""
from dataclasses import dataclass
from typing import Callable

from psycopg import ClientCursor
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from sqlalchemy import Boolean, bindparam, delete, exists, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from .. import metrics
from ..events.models import Event, TicketType
from ..messages.models import OutboxMessage
from .models import IdempotencyKey, Order, OrderLogEntry, Ticket

ORDERS, TICKETS, TICKET_TYPES, EVENTS = Order.__table__, Ticket.__table__, TicketType.__table__, Event.__table__
ORDER_LOG, KEYS, MESSAGES = OrderLogEntry.__table__, IdempotencyKey.__table__, OutboxMessage.__table__

_ORDER_ROW = (
    select(ORDERS, TICKET_TYPES.c.code.label("ticket_type_code"), EVENTS.c.slug.label("event_slug"))
    .join_from(ORDERS, TICKET_TYPES)
    .join(EVENTS)
)
# How an order is named: our id, or (in a payment result) PayHero's two references.
_FIND_BY = {
    column.key: _ORDER_ROW.where(column == bindparam("key"))
    for column in (ORDERS.c.id, ORDERS.c.checkout_request_id, ORDERS.c.payhero_reference)
}
# A payment result's order, with whether another order already holds the payment's receipt or
# reference (one payment never completes two orders), in the same round trip.  The unique indexes
# on both catch a race past this check.
_OTHER = ORDERS.alias("other")
_PAID_ANOTHER_ORDER = exists().where(
    _OTHER.c.id != ORDERS.c.id,
    (_OTHER.c.receipt == bindparam("receipt")) | (_OTHER.c.payhero_reference == bindparam("reference")),
).label("paid_another_order")
_PAYMENT_BY = {key: statement.add_columns(_PAID_ANOTHER_ORDER) for key, statement in _FIND_BY.items()}
_LOCK_BY = {key: statement.with_for_update(of=ORDERS) for key, statement in _PAYMENT_BY.items()}
_TICKET_CODES = select(TICKETS.c.code).where(TICKETS.c.order_id == bindparam("order_id")).order_by(TICKETS.c.id)
# Many orders at once, for the waits arriving together (batched_reads.py).
_READ_MANY = _ORDER_ROW.where(ORDERS.c.id.in_(bindparam("ids", expanding=True)))
_TICKET_CODES_OF_MANY = (select(TICKETS.c.order_id, TICKETS.c.code)
                         .where(TICKETS.c.order_id.in_(bindparam("order_ids", expanding=True))).order_by(TICKETS.c.id))
# Compare-and-set on the version: PostgreSQL's row lock already makes it hold; SQLite has no
# row locks (and pysqlite reads outside any transaction), so there a writer that got there
# first is noticed here instead of overwritten.
_UPDATE_ORDER = update(ORDERS).where(ORDERS.c.id == bindparam("order_id"),
                                     ORDERS.c.version == bindparam("read_version"))
_INSERT_TICKET = insert(TICKETS)
# In SQL, not in Python: concurrent failures on one ticket type must not overwrite each other.
_RELEASE_TICKETS = (update(TICKET_TYPES).where(TICKET_TYPES.c.id == bindparam("ticket_type_id"))
                    .values(reserved=TICKET_TYPES.c.reserved - bindparam("quantity")))

# A late success takes its order's tickets again, only if they are still free: in one guarded
# statement, so two late successes (or one and a new order) can never oversell the last ones.
_HOLD_AGAIN = (update(TICKET_TYPES).where(TICKET_TYPES.c.id == bindparam("ticket_type_id"),
                                          TICKET_TYPES.c.capacity - TICKET_TYPES.c.reserved >= bindparam("quantity"))
               .values(reserved=TICKET_TYPES.c.reserved + bindparam("quantity")))

# -- a payment's change (service._apply) --
# On PostgreSQL one statement after the locking read, rather than four or five: the order's guarded
# UPDATE, its tickets, its messages (the outbox), the tickets it gives back and the row recording the
# payment (a stored callback).  On a worker holding thousands of waits each round trip waits its turn
# of the event loop, and a storm's slow runs grew in psycopg's sends of those statements (BENCHMARKS.md).
# Every column a change may set, the row's own value where it does not: one statement for every change.
_CHANGE_COLUMNS = ("status", "result_code", "result_desc", "receipt", "payhero_reference", "checkout_request_id",
                   "refund_due", "version", "updated_at")
_CHANGED = (_UPDATE_ORDER.values({name: bindparam(name, type_=ORDERS.c[name].type) for name in _CHANGE_COLUMNS})
            .returning(ORDERS.c.id, ORDERS.c.ticket_type_id, ORDERS.c.quantity).cte("changed"))
# The rest only FROM changed, so only if the guarded UPDATE was made; rows given as one array per column.
_MESSAGE_COLUMNS = ("channel", "recipient", "state", "attempts", "next_attempt_at", "created_at")


def _each(name, column):
    return func.unnest(bindparam(name, type_=postgresql.ARRAY(column.type)))


_TICKETS_ADDED = (insert(TICKETS)
                  .from_select(["order_id", "code"], select(_CHANGED.c.id, _each("codes", TICKETS.c.code)))
                  .cte("tickets_added"))
_MESSAGES_QUEUED = (insert(MESSAGES).from_select(["order_id", *_MESSAGE_COLUMNS],
                                                 select(_CHANGED.c.id, *(_each("message_" + name, MESSAGES.c[name])
                                                                        for name in _MESSAGE_COLUMNS)))
                    .cte("messages_queued"))
# A ticket type's row is what buyers queue on: not touched at all unless the change gives tickets back.
_TICKETS_RELEASED = (update(TICKET_TYPES)
                     .where(TICKET_TYPES.c.id == _CHANGED.c.ticket_type_id, bindparam("releases", type_=Boolean))
                     .values(reserved=TICKET_TYPES.c.reserved - _CHANGED.c.quantity)
                     .cte("tickets_released"))
_QUEUE_MESSAGES = insert(MESSAGES)  # SQLite: as many rows as given, one executemany
# `guard` divides by the orders changed: none (the order changed under its lock, which the lock rules out)
# fails the statement, and the transaction with it, even where its COMMIT went with it (_execute_then_commit).
_CHANGE = (select(func.count().label("changed"), (1 / func.count()).label("guard")).select_from(_CHANGED)
           .add_cte(_TICKETS_ADDED, _MESSAGES_QUEUED, _TICKETS_RELEASED))
_CHANGE_RECORDED = {}  # RowWrite.statement -> _CHANGE with that row written too, built once for each


@dataclass(frozen=True)
class RowWrite:
    """A row of its caller's own, written with an order's change (change_order) or alone (write_row): an
    INSERT or UPDATE of one row, RETURNING its id, built once, its parameters named apart from the
    order's (prefixed); `written(id)` is told the row's id once it is sent."""

    statement: object
    params: dict
    written: Callable


def _change_recorded(statement):
    try:
        return _CHANGE_RECORDED[statement]
    except KeyError:
        recorded = statement.cte("recorded")
        _CHANGE_RECORDED[statement] = _CHANGE.add_columns(select(recorded.c.id).scalar_subquery().label("recorded"))
        return _CHANGE_RECORDED[statement]


# -- creating an order --
# The ticket type as the API names it (event slug, type code), and whether it has room.
_NAMED_TYPE = (TICKET_TYPES.c.event_id == EVENTS.c.id, EVENTS.c.slug == bindparam("event_slug"),
               TICKET_TYPES.c.code == bindparam("ticket_type_code"))
_HAS_ROOM = TICKET_TYPES.c.capacity - TICKET_TYPES.c.reserved >= bindparam("quantity")
# On sale at "now", within the type's max_per_order: else the refusal says which (events.service.order_refusal).
_NOW = bindparam("now", type_=EVENTS.c.starts_at.type)
_ORDERABLE = (*_NAMED_TYPE, _HAS_ROOM, TICKET_TYPES.c.max_per_order >= bindparam("quantity"),
              or_(EVENTS.c.sales_start.is_(None), EVENTS.c.sales_start <= _NOW),
              func.coalesce(EVENTS.c.sales_end, EVENTS.c.starts_at) > _NOW)
# The new order's own values, given by the caller; its ticket type and amount come from the reservation.
_NEW_ORDER = ("id", "status", "version", "quantity", "name", "email", "phone", "created_at", "updated_at")


def _insert_order_for(ticket_type):
    """INSERT INTO orders ... SELECT: one order per row of `ticket_type` (id, price), none if it has no row."""
    values = [bindparam("new_" + name, type_=ORDERS.c[name].type) for name in _NEW_ORDER]
    return (insert(ORDERS)
            .from_select([*_NEW_ORDER, "ticket_type_id", "amount"],
                         select(*values, ticket_type.c.id, ticket_type.c.price * bindparam("quantity")))
            .returning(ORDERS.c.ticket_type_id, ORDERS.c.amount))


def _claim_key(dialect_insert):
    """INSERT the Idempotency-Key naming the new order; nothing when the key is taken, unless its
    claim is older than `key_expired_before` (then it is the new order's)."""
    claim = dialect_insert(KEYS).values(key=bindparam("key_value"), body_hash=bindparam("key_body_hash"),
                                        order_id=bindparam("new_id", type_=ORDERS.c.id.type),
                                        created_at=bindparam("new_created_at", type_=ORDERS.c.created_at.type))
    taken_over = {name: claim.excluded[name] for name in ("body_hash", "order_id", "created_at")}
    return (claim.on_conflict_do_update(index_elements=[KEYS.c.key], set_={**taken_over, "status_code": None, "answer": None},
                                        where=KEYS.c.created_at < bindparam("key_expired_before"))
            .returning(KEYS.c.key))


def _reserved(*guards):
    """The guarded reservation, as a CTE returning the ticket type's (id, price) when it was orderable."""
    return (update(TICKET_TYPES).where(*_ORDERABLE, *guards)
            .values(reserved=TICKET_TYPES.c.reserved + bindparam("quantity"))
            .returning(TICKET_TYPES.c.id, TICKET_TYPES.c.price)
            .cte("reserved"))


# PostgreSQL: the guarded reservation and the INSERT in one statement (a data-modifying CTE).
# Run on its own (autocommit), the hot ticket type's row lock lasts the statement and its
# commit inside the server, never a round trip back to this worker.
_RESERVED = _reserved()
_RESERVE_AND_INSERT = _insert_order_for(_RESERVED).add_cte(_RESERVED)
# With an Idempotency-Key, claimed in the same statement, and the tickets reserved only if it was:
# a second request with the key waits on the first one's claim (ON CONFLICT), then finds it taken.
_CLAIMED = _claim_key(postgresql.insert).cte("claimed")
_RESERVED_IF_CLAIMED = _reserved(select(_CLAIMED.c.key).exists())
_CLAIM_RESERVE_AND_INSERT = _insert_order_for(_RESERVED_IF_CLAIMED).add_cte(_CLAIMED).add_cte(_RESERVED_IF_CLAIMED)
_CLAIM = _claim_key(sqlite.insert)  # SQLite: one writer at a time, so a statement before the order's, in its transaction
# SQLite allows no UPDATE in a CTE; it has one writer at a time, so an INSERT that checks the
# room and then the UPDATE, in one transaction, cannot be overtaken.
_INSERT_IF_ROOM = _insert_order_for(select(TICKET_TYPES.c.id, TICKET_TYPES.c.price)
                                    .where(*_ORDERABLE).subquery())
_RESERVE = (update(TICKET_TYPES).where(TICKET_TYPES.c.id == bindparam("ticket_type_id"))
            .values(reserved=TICKET_TYPES.c.reserved + bindparam("quantity")))
_SAVE_PAYHERO_ANSWER = (
    update(ORDERS)
    # Else a callback got here first and said it already.
    .where(ORDERS.c.id == bindparam("order_id"), ORDERS.c.payhero_reference.is_(None))
    .values(payhero_reference=bindparam("reference"),
            checkout_request_id=func.coalesce(ORDERS.c.checkout_request_id, bindparam("checkout_request_id")),
            ask_at=bindparam("ask_at", type_=ORDERS.c.ask_at.type),
            version=ORDERS.c.version + 1, updated_at=bindparam("now"))
    .returning(*ORDERS.c)
)
# PayHero's answer goes in the order's log (service.add_note) whatever became of it.
_NOTE_PAYHERO_ANSWER = insert(ORDER_LOG).values(order_id=bindparam("order_id"), at=bindparam("now"), kind="stk_push",
                                                detail=bindparam("note", type_=ORDER_LOG.c.detail.type))
# PostgreSQL: both in one statement, so that the order's second write is one commit too.
_SAVE_AND_NOTE = _SAVE_PAYHERO_ANSWER.add_cte(_NOTE_PAYHERO_ANSWER.cte("noted"))

# -- Idempotency-Key: the first answer, then what a retry reads --
_KEY_OF_ORDER = (KEYS.c.key == bindparam("key_value"), KEYS.c.order_id == bindparam("key_order_id"))
_ANSWER_KEY = update(KEYS).where(*_KEY_OF_ORDER).values(status_code=bindparam("status_code"),
                                                        answer=bindparam("answer", type_=KEYS.c.answer.type))
_SAVE_NOTE_AND_ANSWER = _SAVE_AND_NOTE.add_cte(_ANSWER_KEY.cte("answered"))
_READ_KEY = select(KEYS).where(KEYS.c.key == bindparam("key_value"))
_KEYS_USED = select(KEYS.c.key).where(KEYS.c.key.in_(bindparam("keys", expanding=True)))
_RELEASE_KEY = delete(KEYS).where(*_KEY_OF_ORDER)
_PURGE_KEYS = delete(KEYS).where(KEYS.c.created_at < bindparam("before"))


_COMPILED = {}  # statement -> (SQL, default parameters, bind processors), for PostgreSQL


def _compiled(statement, dialect):
    try:
        return _COMPILED[statement]
    except KeyError:
        compiled = statement.compile(dialect=dialect)
        # The bind processors: what SQLAlchemy does to a value before psycopg sees it (JSON: dumps).
        _COMPILED[statement] = (str(compiled), compiled.params, compiled._bind_processors)
        return _COMPILED[statement]


def _driver_sql(statement, dialect, params):
    """`statement` as psycopg takes it: its SQL, and `params` with its defaults, each processed as SQLAlchemy
    would before the driver sees it (JSON: dumps)."""
    sql, defaults, processors = _compiled(statement, dialect)
    values = {**defaults, **params}
    for key, process in processors.items():
        values[key] = process(values[key])
    return sql, values


def _as_sqlalchemy_error(exc, sql, values, dialect, driver):
    """A psycopg error raised straight from the driver, as SQLAlchemy's Connection.execute would raise it."""
    return DBAPIError.instance(sql, values, exc, dialect.loaded_dbapi.Error, hide_parameters=True,
                               connection_invalidated=dialect.is_disconnect(exc, driver, None), dialect=dialect)


def run_alone(engine, statement, params):
    """Run `statement` as its own transaction (autocommit) on a pooled psycopg connection; its first row, a dict, or None.

    The connection is checked out as any other (engine.connect(): the idle ping, and a failure
    to connect raised and watched as everywhere else, database.py), and goes back out of autocommit
    (database.autocommit_off_when_given_back).  Errors as _in_one_query's.
    """
    with engine.connect() as connection:
        connection.connection.driver_connection.autocommit = True
        return _in_one_query(connection, statement, params)


def read(connection, order_id):
    return connection.execute(_FIND_BY["id"], {"key": order_id}).mappings().first()


def read_many(connection, order_ids):
    """The rows of those of `order_ids` that exist, in one query."""
    return connection.execute(_READ_MANY, {"ids": list(order_ids)}).mappings().all()


def ticket_codes_of_many(connection, order_ids):
    """{order id: [ticket codes]} for `order_ids`, in one query."""
    codes = {}
    for order_id, code in connection.execute(_TICKET_CODES_OF_MANY, {"order_ids": list(order_ids)}):
        codes.setdefault(order_id, []).append(code)
    return codes


def find_for_payment(connection, keys, lock, receipt=None, reference=None):
    """The first order matching one of `keys`, (column name, value) pairs tried in order; locked if `lock`.

    Its row has `paid_another_order`: whether an order other than it holds `receipt` or `reference`.
    """
    statements = _LOCK_BY if lock else _PAYMENT_BY
    for column, value in keys:
        if value:
            params = {"key": value, "receipt": receipt, "reference": reference}
            if lock and _begins_transaction(connection):
                row = _begin_then_read(connection, statements[column], params)
            else:
                row = connection.execute(statements[column], params).mappings().first()
            if row is not None:
                return row
    return None


def _begins_transaction(connection):
    """Whether the next statement on `connection` begins its transaction on PostgreSQL (psycopg would send
    BEGIN first, on a round trip of its own)."""
    return (connection.dialect.name == "postgresql"
            and connection.connection.driver_connection.pgconn.transaction_status == TransactionStatus.IDLE)


def _begin_then_read(connection, statement, params):
    """`statement`'s first row (a dict, or None), sent as one query behind a BEGIN of our own: a callback's
    transaction starts with its locking read, one round trip where psycopg's own BEGIN made two.

    Each round trip of a callback waits its turn of a busy worker's loop (100-400 ms each at 170 arrivals a
    second, pg_stat_activity: `idle in transaction` after BEGIN and after the read) and holds one of the
    callbacks' pooled connections meanwhile; with three, callbacks queued for a connection for seconds.
    psycopg sends its BEGIN only outside autocommit, so the connection is in autocommit for the rest of its
    checkout: the transaction is PostgreSQL's, psycopg's commit and rollback still end it (they look at the
    server's transaction status), and autocommit goes off again when it is given back (database.py)."""
    connection.connection.driver_connection.autocommit = True
    return _in_one_query(connection, statement, params, before="BEGIN;\n")


def ticket_codes(connection, order_id):
    return connection.execute(_TICKET_CODES, {"order_id": order_id}).scalars().all()


def update_order(connection, row, changes):
    """Write `changes` to the order read as `row`; False if it changed since it was read."""
    result = connection.execute(_UPDATE_ORDER, {"order_id": row["id"], "read_version": row["version"], **changes})
    return result.rowcount == 1


def add_tickets(connection, order_id, codes):
    connection.execute(_INSERT_TICKET, [{"order_id": order_id, "code": code} for code in codes])


def change_order(connection, row, changes, codes=(), messages=(), releases=False, record=None, commit=False):
    """Write `changes` to the order read as `row` and, only if it was written: add its tickets `codes`, queue
    its `messages` (outbox rows, the columns of _MESSAGE_COLUMNS), give its tickets back if `releases`, and
    write `record` (a RowWrite).  False, and nothing written, if the order changed since it was read.

    On PostgreSQL one statement, which the row lock the caller holds (find_for_payment) always lets through;
    with `commit`, sent with the transaction's COMMIT in one round trip (the caller's session then finds it
    committed).  On SQLite one statement each, as they were before, and the caller commits.
    """
    if connection.dialect.name != "postgresql":
        if not update_order(connection, row, changes):
            return False
        if codes:
            add_tickets(connection, row["id"], codes)
        if messages:
            connection.execute(_QUEUE_MESSAGES, list(messages))
        if releases:
            release_tickets(connection, row["ticket_type_id"], row["quantity"])
        if record is not None:
            write_row(connection, record)
        return True
    params = {"order_id": row["id"], "read_version": row["version"], "codes": list(codes), "releases": releases,
              **{name: row[name] for name in _CHANGE_COLUMNS}, **changes,
              **{"message_" + name: [message[name] for message in messages] for name in _MESSAGE_COLUMNS}}
    statement = _CHANGE if record is None else _change_recorded(record.statement)
    params = params if record is None else {**params, **record.params}
    if commit:
        written = _execute_then_commit(connection, statement, params)
    else:
        written = connection.execute(statement, params).mappings().one()
    # Changed: an order that changed under its lock failed the statement (its guard), the record with it.
    if record is not None:
        record.written(written["recorded"])
    return True


def _execute_then_commit(connection, statement, params):
    """`statement`'s row (a dict), sent with COMMIT as one query, on the driver connection under
    `connection`'s open transaction: one send, one wait, one round trip.

    A change that gives tickets back updates the ticket type's row, which every arriving order of that type
    also updates: committed a round trip later, through a busy worker's event loop, the row stayed locked
    for that turn, and the orders queued behind it (pg_stat_activity at 100 arrivals a second: on average 15
    backends waiting on the transaction's lock, BENCHMARKS.md).  Sent together, PostgreSQL commits straight
    after the statement, or skips the COMMIT if the statement fails (the transaction is then left aborted
    for the caller's rollback).  It also saves every callback a round trip.

    PostgreSQL's simple protocol takes two statements in one query; its parameters are then quoted by
    psycopg (a ClientCursor).  psycopg's pipeline would also make one round trip, but under gevent it waits
    on the hub once for each command it queues, and the statement's lock would be held across those turns.
    """
    return _in_one_query(connection, statement, params, after=";\nCOMMIT")


def _in_one_query(connection, statement, params, before="", after=""):
    """`statement`'s first row (a dict, or None), sent between `before` and `after` (other statements, if any)
    as one query, straight to psycopg on the driver connection under `connection`: one send, one wait, and
    none of SQLAlchemy's execution context around it.

    Other statements with it need PostgreSQL's simple protocol, whose parameters psycopg quotes itself (a
    ClientCursor); alone, it keeps server-side parameters.  A driver error is raised as SQLAlchemy's
    (DBAPIError), as Connection.execute raises it; a connection lost, or left with its answer unread, is
    invalidated as SQLAlchemy does for its own statements.
    """
    sql, values = _driver_sql(statement, connection.dialect, params)
    driver = connection.connection.driver_connection
    metrics.db_queries.inc()
    cursor = (ClientCursor(driver, row_factory=dict_row) if before or after
              else driver.cursor(row_factory=dict_row))
    settled = False  # the connection's state known: answered, or refused by PostgreSQL with the transaction open
    try:
        cursor.execute(before + sql + after, values)
        if before:
            cursor.nextset()  # past `before`'s results to the statement's
        row = cursor.fetchone()
        settled = True
        return row
    except connection.dialect.loaded_dbapi.Error as exc:
        error = _as_sqlalchemy_error(exc, sql, values, connection.dialect, driver)
        settled = not error.connection_invalidated
        raise error from exc
    finally:
        cursor.close()
        if not settled:
            connection.invalidate()


def write_row(connection, write):
    """Write `write` (a RowWrite) alone, in the connection's transaction."""
    write.written(connection.execute(write.statement, write.params).scalar_one())


def release_tickets(connection, ticket_type_id, quantity):
    connection.execute(_RELEASE_TICKETS, {"ticket_type_id": ticket_type_id, "quantity": quantity})


def hold_tickets_again(connection, ticket_type_id, quantity):
    """Take `quantity` tickets of the type back for an order that had let them go; False if too few are free."""
    return connection.execute(_HOLD_AGAIN, {"ticket_type_id": ticket_type_id, "quantity": quantity}).rowcount == 1


def create_order(bind, order, event_slug, ticket_type_code, key=None):
    """Reserve `order["quantity"]` tickets and insert `order` (the columns of _NEW_ORDER).

    Returns {"ticket_type_id", "amount"}, or None when the ticket type is unknown, not on sale at
    the order's created_at, allows fewer in one order, or has too few tickets left (nothing is
    written then).  `bind`: on PostgreSQL the engine (the statement is its own transaction,
    run_alone); on SQLite a connection, and the caller commits.
    `key`: {"value", "body_hash", "expired_before"}, an Idempotency-Key claimed for the order
    first; None too when the key is taken (nothing is written), or was claimed and no order was
    made (the claim stays on PostgreSQL: read_key tells which, release_key undoes it).
    """
    params = {"event_slug": event_slug, "ticket_type_code": ticket_type_code, "quantity": order["quantity"],
              "now": order["created_at"],
              **{"new_" + name: order[name] for name in _NEW_ORDER}}
    if key is not None:
        params.update(key_value=key["value"], key_body_hash=key["body_hash"], key_expired_before=key["expired_before"])
    if bind.dialect.name == "postgresql":
        return run_alone(bind, _RESERVE_AND_INSERT if key is None else _CLAIM_RESERVE_AND_INSERT, params)
    if key is not None and bind.execute(_CLAIM, params).first() is None:
        return None
    created = bind.execute(_INSERT_IF_ROOM, params).mappings().first()
    if created is not None:
        bind.execute(_RESERVE, {"ticket_type_id": created["ticket_type_id"], "quantity": order["quantity"]})
    return created


def save_payhero_answer(bind, order_id, reference, checkout_request_id, now, key=None, ask_at=None):
    """Store PayHero's references on the order (version + 1) and note the answer in its log;
    with the order's Idempotency-Key (its value), record that its first answer is a 201.
    `ask_at`: when to ask PayHero about it should no callback come (missed_callbacks.py).

    Returns the order's new row, or None if it already had them.  `bind` as for create_order:
    on PostgreSQL one statement, its own transaction; on SQLite the caller commits.
    """
    params = {"order_id": order_id, "reference": reference, "checkout_request_id": checkout_request_id, "now": now,
              "ask_at": ask_at,
              "note": {"accepted": True, "reference": reference, "checkout_request_id": checkout_request_id},
              "key_value": key, "key_order_id": order_id, "status_code": 201, "answer": None}
    if bind.dialect.name == "postgresql":
        return run_alone(bind, _SAVE_AND_NOTE if key is None else _SAVE_NOTE_AND_ANSWER, params)
    bind.execute(_NOTE_PAYHERO_ANSWER, params)
    if key is not None:
        bind.execute(_ANSWER_KEY, params)
    return bind.execute(_SAVE_PAYHERO_ANSWER, params).mappings().first()


def answer_key(connection, key, order_id, status_code, answer=None):
    """Record the first answer given for the Idempotency-Key `key` that made the order `order_id`."""
    connection.execute(_ANSWER_KEY, {"key_value": key, "key_order_id": order_id, "status_code": status_code,
                                     "answer": answer})


def read_key(connection, key):
    """The Idempotency-Key's row (key, body_hash, order_id, status_code, answer, created_at), or None."""
    return connection.execute(_READ_KEY, {"key_value": key}).mappings().first()


def keys_used(connection, keys):
    """Those of the Idempotency-Keys `keys` that made (or are making) an order."""
    return set(connection.execute(_KEYS_USED, {"keys": list(keys)}).scalars())


def release_key(connection, key, order_id):
    """Forget the key's claim for `order_id` (no order was made, or the buyer was told to try again)."""
    connection.execute(_RELEASE_KEY, {"key_value": key, "key_order_id": order_id})


def purge_keys(connection, before):
    """Delete the Idempotency-Keys claimed before `before`; how many."""
    return connection.execute(_PURGE_KEYS, {"before": before}).rowcount
