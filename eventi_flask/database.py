"""Whether the database answers: one warning when it goes away, one line when it is back.

While it is away every route answers 503 `database_unavailable` (errors.py), without a traceback
per request.  Nothing needs restarting: a connection found dead is dropped (ping_idle_connections
tests the ones that sat idle) and the pool opens new ones as soon as the database accepts them.
"""
import logging
import time
from contextlib import contextmanager

from flask import current_app, g
from sqlalchemy import create_engine, event
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from . import metrics, sqlite
from .extensions import SESSION_ENGINE, db

log = logging.getLogger(__name__)

WATCH = "eventi.database"
# Every database 503 says the same; the status page backs off further on its own when asked again.
RETRY_AFTER = "2"


def is_unavailable(exc):
    """True for an error that means the database cannot take work now, rather than a bug of ours:
    it cannot be reached, dropped the connection, is starting or stopping, or every pooled
    connection is busy (PoolTimeout)."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def unless_unavailable(function, *args, default=None):
    """function(*args), or `default` while the database cannot take work: for background reads
    that simply try again later (the outage is logged once, by DatabaseWatch)."""
    try:
        return function(*args)
    except SQLAlchemyError as exc:
        if not is_unavailable(exc):
            raise
        return default


def cause(exc):
    """The driver's own message on one line, without SQLAlchemy's statement and link."""
    return " ".join(str(getattr(exc, "orig", None) or exc).split()) or type(exc).__name__


# A pooled connection is pinged before use only when it has sat idle this long: one that was
# in use a moment ago is alive, and pinging at every checkout (pool_pre_ping) cost two round
# trips, a fifth of an order's CPU, in a ticket drop (BENCHMARKS.md). One that died meanwhile
# fails its statement instead; SQLAlchemy then drops the pool's connections and reconnects.
PING_AFTER_IDLE_SECONDS = 1.0


def ping_idle_connections(engine):
    @event.listens_for(engine, "checkin")
    def _idle_from(dbapi_connection, record):
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection, record, proxy):
        idle_since = record.info.pop("idle_since", None)  # None: a connection just made
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            raise DisconnectionError(str(error)) from error  # the pool replaces it and tries again


def autocommit_off_when_given_back(engine):
    """A connection put in autocommit for one checkout (an order's statement run alone, a callback's
    transaction begun with its own BEGIN: orders/rows.py) is, given back, as the pool's other users expect it
    again.  One that cannot be (still in a transaction: nothing should leave it so) is dropped."""
    @event.listens_for(engine, "checkin")
    def _autocommit_off(dbapi_connection, record):
        if dbapi_connection is None or not dbapi_connection.autocommit:
            return
        try:
            dbapi_connection.autocommit = False
        except engine.dialect.loaded_dbapi.Error:
            record.invalidate()


class DatabaseWatch:
    """Follows the engines of one database: a failed connection attempt means the database is
    away; the next connection that succeeds, on any of them, means it is back.  A connection
    dropped mid-query alone is not an outage (the pool reconnects at once); if it was one, the
    reconnect fails and says so."""

    def __init__(self, *engines):
        self.down_since = None
        for engine in dict.fromkeys(engines):  # each once (SQLite's callbacks engine is the app's)
            event.listen(engine, "handle_error", self._on_error)
            event.listen(engine, "connect", self._on_connect)

    def _on_error(self, context):
        # No connection and not a pre-ping: opening a new connection failed.
        failed_to_connect = context.connection is None and not context.is_pre_ping
        if failed_to_connect and self.down_since is None and is_unavailable(context.sqlalchemy_exception):
            self.down_since = time.monotonic()
            metrics.database_available.set(0)
            metrics.database_transitions.labels("unavailable").inc()
            log.warning("Database unavailable, answering 503 until it is back: %s",
                        cause(context.original_exception))

    def _on_connect(self, dbapi_connection, connection_record):
        if self.down_since is not None:
            seconds = time.monotonic() - self.down_since
            self.down_since = None
            metrics.database_available.set(1)
            metrics.database_transitions.labels("available").inc()
            log.info("Database available again after %.1fs", seconds)


WAITS_ENGINE = "eventi.database.waits"
CALLBACKS_ENGINE = "eventi.database.callbacks"
# How long a callback waits for one of its own connections before it is answered 503: while the
# database is slow rather than down, a late 200 beats a 503 from a sender that never resends.
# Within what a callback's sender waits: the bench's PayHero-like sender and Heroku's router
# give up at 30 s (PayHero documents no timeout of its own); the callback's work needs the rest.
CALLBACK_POOL_TIMEOUT = 20.0


def waits_engine():
    """The engine of the waits' reads (orders/batched_reads.py).

    On PostgreSQL, a connection of their own per batched reader: one greenlet reads for every
    arriving wait, so one connection is all it needs, and a pool busy with callbacks never makes a storm of
    waits queue for a connection (a 503 past the pool's timeout), nor the callbacks for the waits.
    Elsewhere (SQLite) the app's engine.
    """
    return current_app.extensions[WAITS_ENGINE]


def callbacks_engine():
    """The engine that settles payments: PayHero's callbacks, re-verifying them, and asking
    PayHero about an order whose callback never came (payhero/, orders/missed_callbacks.py,
    reconcile).

    On PostgreSQL, DB_CALLBACK_POOL_SIZE connections of their own, which order creations cannot
    take: at sales open every connection of the app's pool can be busy with buyers queued on a
    ticket type's row, and PayHero never resends a callback answered 503 (issue 24).  A callback
    holds its connection for a few statements (none while PayHero is asked), but on a worker
    holding 10,000 waits each statement also waits its turn of the event loop: 4 connections
    capped it near 150 callbacks a second and made each wait 0.4-0.8 s for one (p50), 8 made it
    35 ms, 10 still 0.6 s in two runs, 16 made it 15-61 ms; hence 16 (and the app's pool then 10 + 14
    rather than 10 + 20, the same 42 a worker at most; 24 + 0 since).  Past them callbacks wait CALLBACK_POOL_TIMEOUT.  Elsewhere (SQLite, one writer
    at a time) the app's engine.
    """
    return current_app.extensions[CALLBACKS_ENGINE]


@contextmanager
def on_callbacks_engine():
    """db.session on callbacks_engine() for the block, then back on the app's engine.

    It holds for the whole app context, across db.session.remove().  The block starts with no
    transaction open on the session and ends with none: its connection goes back to the
    callbacks' pool whatever happened.  Nested, or on SQLite (the app's engine), it changes nothing.
    """
    engine = callbacks_engine()
    if engine is db.engine or g.get(SESSION_ENGINE) is engine:
        yield
        return
    if db.session().in_transaction():
        raise RuntimeError("on_callbacks_engine() with a transaction open on the app's engine: end it first")
    setattr(g, SESSION_ENGINE, engine)
    try:
        yield
    finally:
        db.session.close()
        g.pop(SESSION_ENGINE)


def _engine_of_its_own(app, **pool):
    """On PostgreSQL, a second engine on the app's database with the app's options but `pool`;
    elsewhere (SQLite) the app's engine."""
    if db.engine.dialect.name != "postgresql":
        return db.engine
    engine = create_engine(db.engine.url, **{**app.config["SQLALCHEMY_ENGINE_OPTIONS"], **pool})
    ping_idle_connections(engine)
    autocommit_off_when_given_back(engine)
    return engine


def init_app(app):
    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            sqlite.init_engine(db.engine)
        else:
            autocommit_off_when_given_back(db.engine)
        ping_idle_connections(db.engine)
        # One connection per batched reader: the waits' orders, and the Idempotency-Keys of buyers sent to a line.
        app.extensions[WAITS_ENGINE] = _engine_of_its_own(app, pool_size=2, max_overflow=0)
        app.extensions[CALLBACKS_ENGINE] = callbacks = _engine_of_its_own(
            app, pool_size=app.config["DB_CALLBACK_POOL_SIZE"], max_overflow=0, pool_timeout=CALLBACK_POOL_TIMEOUT)
        # A callback may be the only request a quiet worker gets: its engine says when the database goes too.
        app.extensions[WATCH] = DatabaseWatch(db.engine, callbacks)
    metrics.database_available.set(1)
