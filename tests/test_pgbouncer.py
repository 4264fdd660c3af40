"""Behind Debian's PgBouncer (1.18: no prepared-statement support) in transaction mode, as on Heroku:
the web process goes through it, the release step goes direct.  Payments end to end, order reads,
then `flask reconcile`, all through the pooler, with no error and no payment lost."""
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import gevent.pool
import psycopg
import pytest
import requests

from eventi_flask.orders.reconcile import EXPIRED_REASON
from tests.support import DEMO, PG_ADMIN_URL, QUIET_LINE, ROOT, LiveServer, free_port, wait_until

PAYMENTS = 80
CUSTOMERS_AT_ONCE = 10
READS_PER_ORDER = 3
QUEUED_FOREVER = "0708000004"  # the sandbox never calls back: left for reconcile


class PgBouncer:
    """pgbouncer on a spare port in front of the test PostgreSQL: transaction mode, a small pool,
    and server connections handed out in turn, so a statement prepared on one is soon run on another."""

    def __init__(self, pool_size=4):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="eventi-pgbouncer-"))
        upstream = urlsplit(PG_ADMIN_URL)
        self.user, self.password = upstream.username, upstream.password
        (self.dir / "userlist.txt").write_text(f'"{self.user}" "{self.password}"\n')
        (self.dir / "pgbouncer.ini").write_text(f"""\
[databases]
* = host={upstream.hostname} port={upstream.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.dir}/userlist.txt
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = {pool_size}
max_client_conn = 500
server_round_robin = 1
logfile = {self.dir}/pgbouncer.log
""")
        self.proc = None

    def start(self):
        command = [shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", "-q", str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            postgres = pwd.getpwnam("postgres")
            os.chown(self.dir, postgres.pw_uid, postgres.pw_gid)
            command[1:1] = ["-u", "postgres"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, 10, 0.05, f"pgbouncer on port {self.port}")
        return self

    def url(self, database):
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def answers(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"pgbouncer exited with {self.proc.returncode}: {self.log()}")
        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=1) as conn:
                return conn.execute("SELECT 1").fetchone() == (1,)
        except psycopg.OperationalError:
            return False

    def log(self):
        path = self.dir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pgbouncer():
    bouncer = PgBouncer().start()
    yield bouncer
    bouncer.stop()


@pytest.fixture
def server_behind(pgbouncer, tmp_path):
    server = LiveServer({**QUIET_LINE, "WEB_CONCURRENCY": "2", "SANDBOX_CALLBACK_DELAY": "0.2", "DB_POOL_SIZE": "2",
                         "DB_MAX_OVERFLOW": "2"},
                        tmp_path / "server.log")
    server.web_env["DATABASE_URL"] = pgbouncer.url(server.db_name)
    try:
        yield server.start()
    finally:
        server.stop()


def pay_and_follow(server, seen):
    """One customer: order, then hold waits until it is final (or a generous deadline: its callback
    was lost); the order as last seen, or None if refused."""
    response = requests.post(f"{server.url}/api/orders", json=DEMO, timeout=15)
    seen.append(response.status_code)
    deadline = time.monotonic() + 30
    while response.status_code in (200, 201) and response.json()["status"] == "pending" and time.monotonic() < deadline:
        order = response.json()
        response = requests.get(f"{server.url}/api/orders/{order['id']}/wait",
                                params={"since": order["version"], "timeout": 10}, timeout=25)
        seen.append(response.status_code)
    return response.json() if response.status_code in (200, 201) else None


@pytest.mark.live
def test_payments_and_reconcile_through_pgbouncer_in_transaction_mode(server_behind, pgbouncer):
    server = server_behind
    seen = []
    customers = gevent.pool.Pool(CUSTOMERS_AT_ONCE)
    # Orders, callbacks and cached waits only commit: nothing resets psycopg's count of runs
    # per statement (a ROLLBACK does), so without the fix this is where statements get prepared.
    finals = [order for order in customers.map(lambda _: pay_and_follow(server, seen), range(PAYMENTS)) if order]
    reads = customers.map(lambda order: requests.get(f"{server.url}/api/orders/{order['id']}", timeout=15),
                          finals * READS_PER_ORDER)
    seen.extend(read.status_code for read in reads)

    completed = [order for order in finals if order["status"] == "completed" and len(order["tickets"]) == 1]
    others = [(order["id"], order["status"], order["version"], order["tickets"]) for order in finals
              if order not in completed]
    assert (len(completed), sorted(code for code in seen if code >= 400), others) == (PAYMENTS, [], [])
    direct = server.env["DATABASE_URL"]  # the truth, read without the pooler
    with psycopg.connect(direct) as conn:
        applied = conn.execute("SELECT count(*) FROM payhero_callbacks WHERE outcome = 'applied'").fetchone()[0]
    assert applied == PAYMENTS

    forgotten = [server.create_order(phone=QUEUED_FOREVER)["id"] for _ in range(8)]
    reconcile = subprocess.run(
        ["flask", "--app", "wsgi", "reconcile"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**server.env, **server.web_env, "RECONCILE_AFTER": "0", "RECONCILE_EXPIRE_AFTER": "0"},
    )
    assert reconcile.returncode == 0, reconcile.stderr
    assert "8 checked, 0 settled, 0 still pending, 8 expired, 0 errors" in reconcile.stdout
    for order_id in forgotten:
        order = requests.get(f"{server.url}/api/orders/{order_id}", timeout=10).json()
        assert (order["status"], order["payment"]["result_desc"]) == ("failed", EXPIRED_REASON)

    log = server.log() + reconcile.stderr
    assert "Traceback" not in log and "ProgrammingError" not in log
    assert "prepared statement" not in pgbouncer.log()
