"""Scale, functionally: 500 held waits on one gunicorn worker, all answered right, over one subscriber.

Timings are not checked here (this machine is shared and noisy); `python -m bench` and
BENCHMARKS.md measure them.  This checks that a larger load is fully and correctly answered.
"""
import json
from pathlib import Path

import gevent
import gevent.pool
import redis
import requests

from eventi_flask.payhero.sandbox import classic_callback
from tests.support import REDIS_URL, wait_until

N = 500
# ResultCode -> the status the order must end in (API.md's table), cycled over the orders.
OUTCOMES = [(0, "The service request is processed successfully.", "completed"),
            (1032, "Request cancelled by user", "cancelled"),
            (1, "The balance is insufficient for the transaction", "failed"),
            (0, "The service request is processed successfully.", "completed"),
            (1037, "DS timeout user cannot be reached", "failed")]


def metric(server, name):
    for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def worker_pid(server):
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    assert len(children) == 1, f"expected one gunicorn worker, found {children}"
    return int(children[0])


def test_500_held_waits_answered_right_over_one_subscriber(live_server_factory):
    server = live_server_factory(WEB_CONCURRENCY="1", LOG_LEVEL="warning")
    session = requests.Session()
    create = gevent.pool.Pool(8)
    orders = create.map(lambda _: server.create_order(phone="0708000004"), range(N))  # no sandbox callback
    assert len({o["id"] for o in orders}) == N

    answers = {}

    def hold(order):
        url = f"{server.url}/api/orders/{order['id']}/wait?timeout=50&since={order['version']}"
        response = requests.get(url, timeout=60)  # its own connection, as a browser tab has
        answers[order["id"]] = (response.status_code, response.json())

    waits = [gevent.spawn(hold, order) for order in orders]
    wait_until(lambda: metric(server, "eventi_waiters") == N, timeout=30, interval=0.2,
               message=f"{N} waits held by the worker")

    pid = worker_pid(server)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        names = [c.get("name", "") for c in client.client_list()]
        assert names.count(f"eventi-sub-{pid}") == 1, "one subscriber connection for the whole worker"
        # A waiter that saw no confirmation within 2 s goes on (the re-check covers it): on a busy
        # machine the listener's last batches can still be on their way.
        wait_until(lambda: metric(server, "eventi_subscribed_channels") == N, timeout=10,
                   message=f"{N} channels subscribed")
        # No wait has been answered before its order changed.
        assert not answers

        def pay(args):
            order, (code, desc, _) = args
            body = classic_callback(order["payment"]["reference"], order["payment"]["checkout_request_id"],
                                    order["id"], order["amount"], "254708000004", code, desc)
            response = session.post(server.url + "/api/payhero/callback?token=sandbox",
                                    data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=30)
            assert response.status_code == 200, response.text

        expected = {order["id"]: OUTCOMES[i % len(OUTCOMES)] for i, order in enumerate(orders)}
        gevent.pool.Pool(16).map(pay, [(order, expected[order["id"]]) for order in orders])
        gevent.joinall(waits, timeout=30, raise_error=True)

        assert len(answers) == N
        wrong = {order_id: (status, body.get("status")) for order_id, (status, body) in answers.items()
                 if status != 200 or body["status"] != expected[order_id][2]}
        assert not wrong, f"{len(wrong)} waits answered wrongly, e.g. {list(wrong.items())[:3]}"
        assert all(body["version"] > order["version"] for order in orders for body in [answers[order["id"]][1]])
        # Still the one subscriber, and every channel let go once its waiter was answered.
        names = [c.get("name", "") for c in client.client_list()]
        assert names.count(f"eventi-sub-{pid}") == 1
        wait_until(lambda: metric(server, "eventi_subscribed_channels") == 0, timeout=10,
                   message="channels unsubscribed after the answers")
        assert metric(server, "eventi_waiters") == 0
    finally:
        client.close()
        gevent.killall(waits)
