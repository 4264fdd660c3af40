"""Helpers for tests: waiting on conditions with deadlines, real servers, databases."""
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import requests
from sqlalchemy import event

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres:postgres@127.0.0.1:5432/postgres")
DEMO = {"event": "test-this-end-to-end", "ticket_type": "early-bird", "quantity": 1,
        "name": "Wanjiku Kamau", "email": "wanjiku@example.com", "phone": "0712345678"}

# A test's setup that makes tens or hundreds of orders back to back is not a crowd at sales open: the line
# forms from buyers' arrival rate (API.md "The line") only where a test asks for it (tests/test_line.py).
QUIET_LINE = {"LINE_START_RATE": "100000"}


def wait_until(predicate, timeout=10.0, interval=0.02, message="condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def create_database(prefix="eventi_test"):
    """A fresh, empty PostgreSQL database; returns (name, url)."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_database(name):
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def procfile_command(process="web"):
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(process + ":"):
            return shlex.split(line.split(":", 1)[1])
    raise AssertionError(f"no {process}: line in the Procfile")


class LiveServer:
    """gunicorn started from the Procfile's web line, after the release step, on its own database."""

    def __init__(self, env, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A fresh database on the test PostgreSQL, unless the test brings its own.
        self.db_name, db_url = create_database() if "DATABASE_URL" not in env else (None, env["DATABASE_URL"])
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "DATABASE_URL": db_url,
            "REDIS_URL": REDIS_URL,
            "REDIS_PREFIX": f"test:{uuid.uuid4().hex[:8]}:",
            "PUBLIC_BASE_URL": self.url,
            "ORDER_LIMIT_PER_PHONE": "off",
            "ORDER_LIMIT_PER_CLIENT": "off",
            **{k: str(v) for k, v in env.items() if v is not None},
        }
        for name, value in env.items():
            if value is None:
                self.env.pop(name, None)
        self.env["PATH"] = f"{Path(sys.executable).parent}:{self.env.get('PATH', '')}"
        # Only for the web process, as Heroku's PgBouncer buildpack wraps only `web:`.
        self.web_env = {}
        self.log_path = log_path
        self.proc = None

    def start(self, timeout=30):
        release = procfile_command("release")
        subprocess.run(release, cwd=ROOT, env=self.env, check=True, capture_output=True)
        subprocess.run(["flask", "--app", "wsgi", "seed-demo"], cwd=ROOT, env=self.env, check=True, capture_output=True)
        return self.start_web(timeout)

    def start_web(self, timeout=30):
        """The web process alone (gunicorn), on this server's port; returns once it answers."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(procfile_command("web"), cwd=ROOT, env={**self.env, **self.web_env},
                                     stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._healthy, timeout, 0.1, f"gunicorn on {self.url} (log: {self.log_path})")
        return self

    def stop_web(self):
        """SIGTERM gunicorn, as a deploy does, and wait for it to exit; the database stays."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(35)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self._log.close()

    def _healthy(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def log(self):
        return Path(self.log_path).read_text(errors="replace")

    def stop(self):
        self.stop_web()
        if self.db_name:
            drop_database(self.db_name)

    def create_order(self, **overrides):
        response = requests.post(self.url + "/api/orders", json={**DEMO, **overrides}, timeout=10)
        assert response.status_code == 201, response.text
        return response.json()



def pending_orders_made_a_while_ago(database_url, count):
    """`count` pending orders written straight to the database, as orders made minutes before a deploy
    are: nothing of them is cached in Redis any more, so every wait reads the database."""
    ids = [secrets.token_urlsafe(16) for _ in range(count)]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO orders (id, status, version, quantity, name, email, phone, created_at, updated_at,
                                ticket_type_id, amount, payhero_reference, checkout_request_id)
            SELECT new.id, 'pending', 2, 1, 'Wanjiku Kamau', 'wanjiku@example.com', '254708000004',
                   now() - interval '5 minutes', now() - interval '5 minutes', tt.id, tt.price,
                   'REF-' || new.id, 'ws_CO_' || new.id
            FROM unnest(%s::text[]) AS new(id), ticket_types tt WHERE tt.code = 'early-bird'""", [ids])
        conn.execute("UPDATE ticket_types SET reserved = reserved + %s WHERE code = 'early-bird'", [count])
    return [{"id": order_id, "version": 2, "amount": 300,
             "payment": {"reference": f"REF-{order_id}", "checkout_request_id": f"ws_CO_{order_id}"}} for order_id in ids]


def reference_asked(request):
    """The reference a transaction-status request asks about (requests-mock's `qs` lowercases values)."""
    return parse_qs(urlsplit(request.url).query)["reference"][0]


CALLBACK_PATH = "/api/payhero/callback?token=sandbox"


def held_waits(server, count):
    """True once `count` waits have started holding on this server (read from its log)."""
    return server.log().count("Long polling started for order") >= count


def get_wait(server, order, timeout=20, since=None):
    params = {"since": order["version"] if since is None else since, "timeout": timeout}
    return requests.get(f"{server.url}/api/orders/{order['id']}/wait", params=params, timeout=timeout + 15)


def post_callback(server, order, **kwargs):
    response = requests.post(f"{server.url}{CALLBACK_PATH}", json=callback_body(order, **kwargs), timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def assert_answered_across(one, other, rounds, within):
    """Waits held on each instance, each answered `completed` within `within` s of its callback landing
    on the other instance; returns the orders.  The sandbox never calls back on their phone."""
    import gevent

    pairs = [(one, other), (other, one)] * rounds
    orders = [waiter.create_order(phone="0708000004") for waiter, _ in pairs]
    waits = [gevent.spawn(get_wait, waiter, order) for (waiter, _), order in zip(pairs, orders)]
    wait_until(lambda: held_waits(one, rounds) and held_waits(other, rounds), message="the waits to be held")
    for (_, landing), order, waiting in zip(pairs, orders, waits):
        sent = time.monotonic()
        post_callback(landing, order)
        response = waiting.get(timeout=within + 5)
        assert response.status_code == 200 and response.json()["status"] == "completed"
        assert time.monotonic() - sent < within
    return orders


def callback_body(order, result_code=0, amount=None, shape="classic", desc=None):
    """A PayHero callback for `order` (an order JSON) in either payload shape, with M-Pesa's own wording."""
    from eventi_flask.payhero.sandbox import result_description, sandbox_callback

    return sandbox_callback(shape, order["payment"]["reference"] or "REF",
                            order["payment"]["checkout_request_id"] or "ws_CO_x", order["id"],
                            order["amount"] if amount is None else amount, "254712345678", result_code,
                            desc or result_description(result_code))


@contextmanager
def buyers_holding_every_connection(app):
    """Every connection of `app`'s pool checked out, each in a transaction left open, one of them
    holding the demo ticket type's row as a buyer's reservation does: sales open (issue 24).
    Yields the pool; an order made meanwhile would wait its 10 s for a connection, then 503."""
    from sqlalchemy import select

    from eventi_flask.events.models import TicketType
    from eventi_flask.extensions import db

    with app.app_context():  # not kept: a request meanwhile must push its own
        engine = db.engine
    pool = engine.pool
    connections = [engine.connect() for _ in range(pool.size() + pool._max_overflow)]
    try:
        connections[0].execute(select(TicketType.id).where(TicketType.code == DEMO["ticket_type"]).with_for_update())
        for connection in connections[1:]:
            connection.exec_driver_sql("SELECT 1")
        assert pool.checkedout() == len(connections)
        yield pool
    finally:
        for connection in connections:
            connection.close()


class Statements:
    """The SQL statements an app's engine runs (an executemany counts once), by their first word; `commits`: how
    many transactions it committed.  `engine_of(app)`: which engine (the app's own by default).

    On PostgreSQL each is a round trip, and so is each COMMIT; psycopg sends a transaction's BEGIN on its own too."""

    def __init__(self, app, engine_of=None):
        from eventi_flask.extensions import db

        self.seen, self.commits = [], 0
        with app.app_context():
            self.engine = engine_of() if engine_of else db.engine
        event.listen(self.engine, "before_cursor_execute", self._count)
        event.listen(self.engine, "commit", self._committed)

    def _count(self, conn, cursor, statement, parameters, context, executemany):
        self.seen.append(statement.split(None, 1)[0].upper())

    def _committed(self, conn):
        self.commits += 1

    def claims(self):
        return sum(1 for statement in self.seen if statement == "WITH")  # the claim: WITH picked ... UPDATE

    def close(self):
        event.remove(self.engine, "before_cursor_execute", self._count)
        event.remove(self.engine, "commit", self._committed)


class RoundTrips:
    """The round trips to PostgreSQL an app's engine makes (`engine_of(app)`, the app's own by default): each
    pooled connection's libpq protocol trace (PQtrace), counted as the times the client sent, then heard."""

    def __init__(self, app, engine_of=None):
        import tempfile

        from eventi_flask.extensions import db

        with app.app_context():
            self.engine = engine_of() if engine_of else db.engine
        self.traces, self._tempfile = [], tempfile.TemporaryFile
        event.listen(self.engine, "checkout", self._trace)

    def _trace(self, dbapi_connection, record, proxy):
        from psycopg import pq

        trace = self._tempfile(mode="w+")
        dbapi_connection.pgconn.trace(trace.fileno())
        dbapi_connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        self.traces.append((dbapi_connection, trace))

    def count(self):
        """The round trips made until close()."""
        trips = 0
        for _, trace in self.traces:
            trace.seek(0)
            direction = None
            for line in trace.read().splitlines():
                sender = line[:2]  # "F\t" the client, "B\t" the server; else a statement's next line
                if sender == "F\t" and direction != "F\t":
                    trips += 1
                if sender in ("F\t", "B\t"):
                    direction = sender
        return trips

    def close(self):
        """Stop tracing (the connections stay in the pool, traced no more); count() still answers."""
        event.remove(self.engine, "checkout", self._trace)
        for connection, _ in self.traces:
            if not connection.closed:
                connection.pgconn.untrace()  # flushes what libpq buffered


# -- event files (API.md), as an organizer writes them --

EAT = timezone(timedelta(hours=3))


def when(**delta):
    """A moment relative to now, as an event file writes it: ISO 8601 in Nairobi time."""
    return (datetime.now(EAT) + timedelta(**delta)).replace(microsecond=0).isoformat()


def event_file(ticket_types=None, **event):
    """An event file as API.md shows it, on sale now; keyword arguments replace (None: leave out) its fields."""
    fields = {"slug": "sauti-live", "name": "Sauti Live", "venue": "Uhuru Gardens, Nairobi", "starts_at": when(days=30),
              "sales_start": when(hours=-1), "sales_end": when(days=29), **event}
    if ticket_types is None:
        ticket_types = [{"id": "vip", "name": "VIP", "price": 5000, "quantity": 5, "max_per_order": 4},
                        {"id": "regular", "name": "Regular", "price": 1500, "quantity": 200}]
    return {"event": fields, "ticket_types": ticket_types}


def toml(data):
    """TOML for `data` (tables of strings, integers and booleans; a table in [event], such as "line", as
    [event.line]): JSON's string escapes are TOML's too."""
    def table(values):
        return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()
                       if value is not None and not isinstance(value, dict))

    inner = "".join(f"\n[event.{key}]\n" + table(value) for key, value in data["event"].items() if isinstance(value, dict))
    return "[event]\n" + table(data["event"]) + inner + "".join(
        "\n[[ticket_types]]\n" + table(entry) for entry in data["ticket_types"])
