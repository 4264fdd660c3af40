"""Customers who leave: a held wait whose client closes its connection is let go at once.

Raw sockets, because a browser tab that closes is exactly that: a request sent,
then the connection gone.  In-process over Werkzeug's server (both hubs; the
hub's state is read directly), and over gunicorn's gevent worker as deployed.
"""
import resource
import socket

import gevent
import pytest
import redis
import requests
from werkzeug.serving import make_server

from eventi_flask import metrics
from tests.support import DEMO, REDIS_URL, callback_body, wait_until
from tests.test_wait import order  # noqa: F401  (fixture: a pending order; the hub fixture is in conftest)

CALLBACK = "/api/payhero/callback?token=sandbox"
NO_CALLBACK = {**DEMO, "phone": "0708000004"}


def open_wait(port, order, timeout=50):
    """A wait sent over a connection of its own, left open: the caller decides when it closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET /api/orders/{order['id']}/wait?timeout={timeout}&since={order['version']} HTTP/1.1\r\n"
                 f"Host: 127.0.0.1:{port}\r\n\r\n".encode())
    return sock


def read_response(sock):
    """(status, body bytes) of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), body[:length]


def departed():
    return metrics.registry.get_sample_value("eventi_waits_departed_total") or 0.0


def rejected(limit):
    return metrics.registry.get_sample_value("eventi_wait_rejected_total", {"limit": limit}) or 0.0


def subscribers(channel):
    with redis.Redis.from_url(REDIS_URL) as client:
        return dict(client.pubsub_numsub(channel))[channel.encode()]


# -- in-process: Werkzeug's threaded server (greenlets, monkey-patched) -----------------------------

@pytest.fixture
def port(app):
    server = make_server("127.0.0.1", 0, app, threaded=True)
    serving = gevent.spawn(server.serve_forever, 0.1)
    yield server.server_port
    server.shutdown()
    serving.join(5)
    server.server_close()


def test_a_client_that_closes_mid_wait_is_let_go_and_unsubscribed(backend, port, hub, order):
    before = departed()
    sock = open_wait(port, order)
    wait_until(lambda: hub.waiter_count == 1, message="the wait to be held")
    if backend == "postgres-redis":
        wait_until(lambda: subscribers(hub.channel(order["id"])) == 1, message="the subscription")
    sock.close()
    wait_until(lambda: hub.waiter_count == 0, message="the departed wait to be let go")  # long before its 50 s
    assert departed() == before + 1
    if backend == "postgres-redis":
        wait_until(lambda: subscribers(hub.channel(order["id"])) == 0, message="the channel unsubscribed")


def test_30_dropped_and_reasked_waits_on_one_order_are_never_refused(port, client, hub, order):
    """A flaky phone: each wait dropped and asked again at once.  More than WAIT_MAX_PER_ORDER (20) of them."""
    before, refused = departed(), rejected("order")
    for i in range(30):
        sock = open_wait(port, order)
        wait_until(lambda: departed() == before + i and hub.waiter_count == 1,
                   message=f"wait {i + 1} held, the ones before let go")
        sock.close()
    wait_until(lambda: hub.waiter_count == 0, message="the last dropped wait to be let go")
    assert departed() == before + 30 and rejected("order") == refused

    sock = open_wait(port, order)  # the customer's connection holds this time
    wait_until(lambda: hub.waiter_count == 1, message="the wait to be held")
    client.post(CALLBACK, json=callback_body(order))
    status, body = read_response(sock)
    sock.close()
    assert status == 200 and b'"status":"completed"' in body.replace(b" ", b"")


def test_a_client_that_stays_or_sends_more_is_still_held(port, client, hub, order):
    quiet = open_wait(port, order)  # keeps its connection open, sends nothing more
    talking = open_wait(port, order)
    wait_until(lambda: hub.waiter_count == 2, message="both waits held")
    talking.sendall(b"GET /healthz HTTP/1.1\r\n")  # the start of a pipelined request: bytes, no end of file
    leaving = open_wait(port, order)
    wait_until(lambda: hub.waiter_count == 3, message="the third wait held")
    before = departed()
    leaving.close()
    wait_until(lambda: departed() == before + 1, message="the closed one let go")
    assert hub.waiter_count == 2  # only the one that left

    client.post(CALLBACK, json=callback_body(order))
    for sock in (quiet, talking):
        status, body = read_response(sock)
        sock.close()
        assert status == 200 and b'"status":"completed"' in body.replace(b" ", b"")


# -- gunicorn's gevent worker, as deployed --------------------------------------------------------

def server_metric(server, name):
    for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.live
def test_gunicorn_lets_go_of_1000_departed_waits_and_keeps_the_one_that_stayed(live_server_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    server = live_server_factory(WEB_CONCURRENCY="1", LOG_LEVEL="warning")
    port = server.port
    orders = [server.create_order(phone=NO_CALLBACK["phone"]) for _ in range(51)]
    stays, leaving_orders = orders[0], orders[1:]
    staying = open_wait(port, stays)
    # 20 waits (WAIT_MAX_PER_ORDER) on each of 50 orders: 1,000 customers on flaky phones.
    leaving = [open_wait(port, order) for order in leaving_orders for _ in range(20)]
    try:
        wait_until(lambda: server_metric(server, "eventi_waiters") == 1001, 30, 0.2, "1,001 waits held")
        wait_until(lambda: server_metric(server, "eventi_subscribed_channels") == 51, 10, 0.2, "51 channels")
        for sock in leaving:
            sock.close()
        wait_until(lambda: server_metric(server, "eventi_waiters") == 1, 15, 0.1, "the 1,000 let go")
        assert server_metric(server, "eventi_waits_departed_total") == 1000
        wait_until(lambda: server_metric(server, "eventi_subscribed_channels") == 1, 10, 0.1,
                   "their channels unsubscribed")
        prefix = server.env["REDIS_PREFIX"]
        assert all(subscribers(f"{prefix}order:status:{o['id']}") == 0 for o in leaving_orders[:10])

        # Each of those orders takes a full set of 20 new waits again: none counts the departed.
        again = [open_wait(port, leaving_orders[0]) for _ in range(20)]
        wait_until(lambda: server_metric(server, "eventi_waiters") == 21, 15, 0.1, "20 new waits held")
        assert server_metric(server, 'eventi_wait_rejected_total{limit="order"}') == 0
        for sock in again:
            sock.close()

        response = requests.post(server.url + CALLBACK, json=callback_body(stays), timeout=10)
        assert response.status_code == 200
        status, body = read_response(staying)
        assert status == 200 and b'"status":"completed"' in body.replace(b" ", b"")
    finally:
        for sock in [staying, *leaving]:
            sock.close()
