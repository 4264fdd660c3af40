"""SQLite, the embedded default: its pragmas, and its work kept off the event loop.

sqlite3 is a C library working on the calling thread: under gevent, the hub's.  Each callback's
commit (with its fsync, and now and then a WAL checkpoint) and every query stalled every greenlet
of the worker while it ran: held waits, timers, Redis messages, other requests.  The sqlite3 module
releases the GIL while SQLite works, so each call that may touch the database file runs in gevent's
native threadpool instead (SQLiteOffLoop), and the greenlet waits for it as it would for a socket.
Processes without gevent (the flask CLI, migrations) keep plain sqlite3 connections; PostgreSQL
(psycopg) already waits on sockets and is not concerned.

Durability is unchanged: WAL with synchronous=FULL (SQLite's default), so a commit returns once the
WAL is on disk, and a callback is still answered 200 only once it is stored.
"""
import collections
import re
import sqlite3

from gevent import get_hub, getcurrent, monkey
from gevent.lock import BoundedSemaphore
from sqlalchemy import event

# How long a writer waits for another one before "database is locked", as SQLite's busy_timeout.
BUSY_SECONDS = 5.0

_native_lock = monkey.get_original("_thread", "allocate_lock")
# The statements before which sqlite3 opens a transaction itself (its legacy transaction control).
_OPENS_A_TRANSACTION = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)


def init_engine(engine):
    """Set the pragmas on every connection of `engine`, and run its calls off the event loop under gevent."""
    writers = BoundedSemaphore(1)

    @event.listens_for(engine, "do_connect")
    def _connect_off_loop(dialect, _record, cargs, cparams):
        # An in-memory database is one per thread (check_same_thread stays on): it is left alone.
        if not monkey.is_module_patched("threading") or cparams.get("check_same_thread", True):
            return None  # SQLAlchemy connects as usual
        lock = _native_lock()
        return SQLiteOffLoop(_off_loop(lock, dialect.loaded_dbapi.connect, *cargs, **cparams), lock, writers)

    @event.listens_for(engine, "connect")
    def _set_pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers and the writer proceed together
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_SECONDS * 1000)}")
        cursor.close()


def _off_loop(lock, function, *args, **kwargs):
    """function(*args, **kwargs) on a thread of gevent's pool, the calling greenlet waiting; its result or exception.

    `lock` is the connection's: a greenlet killed while its call runs (a background greenlet stopped)
    leaves that call running, and the connection's next user (the pool's rollback) must wait for it:
    a sqlite3 connection is not for two threads at once.
    """
    hub = get_hub()
    if getcurrent() is hub:  # e.g. a connection's finaliser run by the loop: it cannot wait, so it works here
        succeeded, value = _holding(lock, function, args, kwargs)
    else:
        succeeded, value = hub.threadpool.apply(_holding, (lock, function, args, kwargs))
    if not succeeded:
        raise value
    return value


def _holding(lock, function, args, kwargs):
    # The exception is handed back as a value: raised in the pool's thread, gevent would print it as a crash.
    with lock:
        try:
            return True, function(*args, **kwargs)
        except Exception as exc:
            return False, exc


class SQLiteOffLoop:
    """A sqlite3 connection whose every call that may reach the database file runs off the event loop.

    What SQLAlchemy's pysqlite dialect and our pragmas call: cursor(), commit(), rollback(), close();
    the rest (create_function, isolation_level, in_transaction) is the connection's own, in memory.

    Writers take turns here, in the process, before sqlite3 opens their transaction: a writer that
    met SQLite's lock would wait for it inside a pool thread, and enough of them would fill the pool
    while the transaction they wait for needs a thread to commit.  Waiting greenlets hold no thread.
    """

    def __init__(self, connection, lock, writers):
        self.__dict__.update(_connection=connection, _lock=lock, _writers=writers, _writing=False)

    def cursor(self):
        return SQLiteCursorOffLoop(self, self._connection.cursor())

    def commit(self):
        # Outside a transaction sqlite3 has nothing to do: a read-only session needs no thread.
        if self._connection.in_transaction:
            self.run(self._connection.commit)
        self._end_turn()

    def rollback(self):
        if self._connection.in_transaction:
            self.run(self._connection.rollback)
        self._end_turn()

    def close(self):
        try:
            self.run(self._connection.close)
        finally:
            self._end_turn(closed=True)  # a closed connection's transaction is gone

    def run(self, function, *args):
        return _off_loop(self._lock, function, *args)

    def execute_statement(self, execute, statement, parameters):
        """execute(statement, parameters) in a thread, in this connection's turn if it opens a write transaction."""
        if not self._writing and not self._connection.in_transaction and _OPENS_A_TRANSACTION.match(statement):
            if not self._writers.acquire(timeout=BUSY_SECONDS):
                raise sqlite3.OperationalError("database is locked")
            self.__dict__["_writing"] = True
        try:
            return self.run(execute, statement, parameters)
        finally:
            self._end_turn()  # the statement failed, or ran as its own transaction

    def _end_turn(self, closed=False):
        if self._writing and (closed or not self._connection.in_transaction):
            self.__dict__["_writing"] = False
            self._writers.release()

    def __getattr__(self, name):
        return getattr(self._connection, name)

    def __setattr__(self, name, value):  # isolation_level, set by the dialect for AUTOCOMMIT
        setattr(self._connection, name, value)


class SQLiteCursorOffLoop:
    """A sqlite3 cursor whose statement runs, and whose rows are all read, in one trip to a thread.

    sqlite3 steps through the rows on fetch: reading them all there costs a statement one trip
    instead of two, and leaves nothing running on the connection once execute() returns; fetches
    are answered from memory.  Our statements return a few rows (the hub's re-check a thousand pairs).
    """

    def __init__(self, connection, cursor):
        self._connection = connection
        self._cursor = cursor
        self._rows = collections.deque()

    def execute(self, statement, parameters=()):
        self._rows = self._connection.execute_statement(self._execute_and_read, statement, parameters)
        return self

    def executemany(self, statement, seq_of_parameters):
        self._rows = self._connection.execute_statement(self._execute_many, statement, seq_of_parameters)
        return self

    def _execute_and_read(self, statement, parameters):
        self._cursor.execute(statement, parameters)
        return collections.deque(self._cursor.fetchall() if self._cursor.description is not None else ())

    def _execute_many(self, statement, seq_of_parameters):
        self._cursor.executemany(statement, seq_of_parameters)
        return collections.deque()

    def fetchone(self):
        return self._rows.popleft() if self._rows else None

    def fetchmany(self, size=None):
        size = self._cursor.arraysize if size is None else size
        return [self._rows.popleft() for _ in range(min(size, len(self._rows)))]

    def fetchall(self):
        rows, self._rows = list(self._rows), collections.deque()
        return rows

    def __iter__(self):
        while self._rows:
            yield self._rows.popleft()

    def close(self):
        # Every row was read in execute(), so sqlite3 has already reset the statement: no file is touched.
        self._rows.clear()
        self._cursor.close()

    def __getattr__(self, name):  # description, rowcount, lastrowid, arraysize
        return getattr(self._cursor, name)
