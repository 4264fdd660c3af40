"""End to end: gunicorn with the gevent worker from the Procfile, a full sandbox payment over HTTP."""
import time

import pytest
import requests

from tests.support import wait_until

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def server(live_server_factory):
    return live_server_factory(SANDBOX_CALLBACK_DELAY="1", WEB_CONCURRENCY="2")


def test_a_sandbox_payment_end_to_end(server):
    order = server.create_order()
    assert order["status"] == "pending" and order["payment"]["reference"]
    started = time.monotonic()
    response = requests.get(f"{server.url}/api/orders/{order['id']}/wait",
                            params={"since": order["version"], "timeout": 20}, timeout=30)
    elapsed = time.monotonic() - started
    body = response.json()
    assert response.status_code == 200 and body["status"] == "completed"
    assert body["payment"]["receipt"] and len(body["tickets"]) == 1
    assert elapsed < 5  # one held request, answered when the callback landed (~1 s)
    log = wait_until(lambda: "status changed via Redis" in server.log() and server.log(), message="the log lines")
    for line in (f"Long polling started for order: {order['id']}",
                 "Subscribed to Redis channel: ", f"order:status:{order['id']}",
                 "PAYHERO Callback received", "Order status updated: completed", "Redis notification sent",
                 f"Redis message received for order: {order['id']}", f"Order {order['id']} status changed via Redis ("):
        assert line in log, line


@pytest.mark.parametrize("phone, status, code", [("0708000001", "cancelled", 1032), ("0708000002", "failed", 1)])
def test_sandbox_failures_follow_the_phone_table(server, phone, status, code):
    order = server.create_order(phone=phone)
    body = requests.get(f"{server.url}/api/orders/{order['id']}/wait", params={"timeout": 20}, timeout=30).json()
    assert (body["status"], body["payment"]["result_code"]) == (status, code)


def test_operations_endpoints(server):
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    ready = requests.get(server.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "notifications": "ok"}
    metrics = requests.get(server.url + "/metrics", timeout=5).text
    for name in ("eventi_waiters", "eventi_wait_duration_seconds", "eventi_delivery_latency_seconds",
                 "eventi_callbacks_total", "eventi_redis_listener_connected"):
        assert name in metrics, name
    # The worker has collected garbage since it started (importing the app is enough), and says how long it took.
    assert 'eventi_gc_pause_seconds_count{generation="0"}' in metrics
