"""A database that stops: a PostgreSQL cluster of the test's own (initdb, pg_ctl as the postgres user,
on a spare port), stopped with `-m immediate` under held waits, order creation, reads and callbacks
served by gunicorn, then started again.  Every route answers 503 with Retry-After meanwhile, the
log says so once, and the service recovers by itself."""
import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import gevent
import pytest
import requests

from tests.support import DEMO, QUIET_LINE, ROOT, LiveServer, free_port, wait_until

NO_CALLBACK = {**DEMO, "phone": "0708000004"}  # the sandbox never calls back: the test sends the callbacks
CALLBACK = "/api/payhero/callback?token=sandbox"
WENT_AWAY = "Database unavailable, answering 503 until it is back"
CAME_BACK = "Database available again"


class PostgresCluster:
    """initdb'd into a temporary directory; started and stopped with pg_ctl as the postgres user."""

    def __init__(self):
        self.bin = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))[-1])
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="eventi-pg-"))
        self.data = self.dir / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/eventi"

    def _run(self, *command):
        command = [str(self.bin / command[0]), *command[1:]]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def init(self):
        if os.geteuid() == 0:
            postgres = pwd.getpwnam("postgres")
            os.chown(self.dir, postgres.pw_uid, postgres.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "eventi")
        return self

    def start(self):
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "postgres.log"), "-w", "start")

    def stop(self, mode="immediate"):
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self):
        try:
            self.stop("fast")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def cluster():
    own = PostgresCluster().init()
    yield own
    own.remove()


@pytest.fixture
def server(cluster, tmp_path):
    # Held orders re-checked against the database every 0.5 s: the outage meets those re-checks too.
    live = LiveServer({**QUIET_LINE, "WEB_CONCURRENCY": "2", "DATABASE_URL": cluster.url, "WAIT_RECHECK_INTERVAL": "0.5"},
                      tmp_path / "server.log")
    try:
        yield live.start()
    finally:
        live.stop()


def get(server, path, **params):
    return requests.get(server.url + path, params=params, timeout=30)


def post_callback(server, order, result_code=0):
    from tests.support import callback_body

    return requests.post(server.url + CALLBACK, json=callback_body(order, result_code=result_code), timeout=30)


def hold(server, order, timeout=50):
    return gevent.spawn(get, server, f"/api/orders/{order['id']}/wait", since=order["version"], timeout=timeout)


def steady_traffic(server, order, statuses):
    """Reads and new orders, about 20 a second until killed, as (time sent, status): what customers keep sending."""
    while True:
        sent = time.monotonic()
        statuses.append((sent, get(server, f"/api/orders/{order['id']}").status_code))
        sent = time.monotonic()
        statuses.append((sent, requests.post(server.url + "/api/orders", json=NO_CALLBACK, timeout=30).status_code))
        gevent.sleep(0.1)


def lines_by_worker(log, text):
    """{pid: how many lines contain `text`} (our log lines carry the worker's pid in brackets)."""
    counts = {}
    for pid in re.findall(r"\[(\d+)\] [\w.]+: " + re.escape(text), log):
        counts[pid] = counts.get(pid, 0) + 1
    return counts


@pytest.mark.live
def test_a_database_outage_answers_503_then_recovers_by_itself(cluster, server):
    held, late = server.create_order(phone=NO_CALLBACK["phone"]), server.create_order(phone=NO_CALLBACK["phone"])
    refused_meanwhile = server.create_order(phone=NO_CALLBACK["phone"])
    waits = [hold(server, held), hold(server, held), hold(server, late)]
    wait_until(lambda: server.log().count("Long polling started for order") >= len(waits), message="the waits held")

    traffic = []  # reads and orders sent all along, across the stop and the start
    running = gevent.spawn(steady_traffic, server, held, traffic)
    wait_until(lambda: len(traffic) >= 4, message="traffic before the stop")

    cluster.stop("immediate")
    stopped = time.monotonic()
    requests_while_down = {
        "create order": lambda: requests.post(server.url + "/api/orders", json=NO_CALLBACK, timeout=30),
        "read order": lambda: get(server, f"/api/orders/{held['id']}"),
        "event": lambda: get(server, "/api/events/test-this-end-to-end"),
        "checkout page": lambda: get(server, "/events/test-this-end-to-end/checkout"),
        "status page": lambda: get(server, f"/orders/{held['id']}"),
        "callback": lambda: post_callback(server, refused_meanwhile),
        "readyz": lambda: get(server, "/readyz"),
    }
    seen = {}
    for _ in range(4):  # enough that both workers meet the outage, and meet it again
        for name, send in requests_while_down.items():
            response = send()
            seen.setdefault(name, set()).add(response.status_code)
            assert response.status_code == 503, (name, response.text)
            if name != "readyz":
                assert response.headers["Retry-After"].isdigit(), name
                error = response.json()["error"]
                assert error["code"] == ("try_again" if name == "callback" else "database_unavailable"), name
                assert error["message"]
    assert set().union(*seen.values()) == {503}
    reconcile = subprocess.run(["flask", "--app", "wsgi", "reconcile"], cwd=ROOT, env=server.env,
                               capture_output=True, text=True, timeout=60)
    assert reconcile.returncode == 1 and "Traceback" not in reconcile.stderr, reconcile.stderr
    assert reconcile.stderr.strip().splitlines()[-1].startswith("Reconcile: database unavailable, nothing done:")
    assert get(server, "/readyz").json()["checks"]["database"].startswith("error")
    assert get(server, "/healthz").status_code == 200  # the process runs: don't restart it
    time.sleep(max(0.0, stopped + 3 - time.monotonic()))  # an outage of 3 s at least: several re-checks meet it
    assert not any(waiting.ready() for waiting in waits)  # held waits hold on

    log = server.log()
    assert "Traceback" not in log and "Unhandled error" not in log
    went_away = lines_by_worker(log, WENT_AWAY)
    assert went_away and set(went_away.values()) == {1}  # once per worker, not once per request

    cluster.start()
    # Recovery without a restart: each worker that saw the outage reconnects on its next request.
    wait_until(lambda: get(server, "/readyz").status_code == 200 and set(went_away) <= set(lines_by_worker(
        server.log(), CAME_BACK)), 30, 0.1, "every worker to reach the database again")
    recovered = time.monotonic()
    wait_until(lambda: sum(sent > recovered for sent, _ in traffic) >= 4, message="traffic after the recovery")
    running.kill()
    assert {status for sent, status in traffic if sent > recovered} <= {200, 201}  # served again, same workers
    statuses = {status for _, status in traffic}
    assert statuses <= {200, 201, 503} and 503 in statuses  # never a 500

    assert post_callback(server, held).json()["status"] == "completed"
    assert post_callback(server, late, result_code=1032).json()["status"] == "cancelled"
    # Answered within moments of the callbacks (in ms on an idle machine; 5 s for a busy one).
    answers = [waiting.get(timeout=5) for waiting in waits]
    assert [(r.status_code, r.json()["status"]) for r in answers] == [(200, "completed")] * 2 + [(200, "cancelled")]
    # PayHero sends the refused callback again: now it is stored and applied.
    assert post_callback(server, refused_meanwhile).json()["status"] == "completed"
    assert get(server, f"/api/orders/{held['id']}").status_code == 200

    log = server.log()
    assert lines_by_worker(log, CAME_BACK) == went_away
    assert lines_by_worker(log, WENT_AWAY) == went_away  # no second outage reported on the way back
    assert "Traceback" not in log and "Unhandled error" not in log
