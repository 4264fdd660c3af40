"""Abuse limits: order creation (each one an STK push) per phone and per client address, and
held waits per order and per worker process.  Over both backends (memory and Redis storage)."""
import gevent
import pytest

from eventi_flask.notify.service import HUB
from tests.support import DEMO, callback_body, wait_until

NO_CALLBACK = {**DEMO, "phone": "0708000004"}
CALLBACK = "/api/payhero/callback?token=sandbox"


def refused(response, status, code):
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code and error["message"] and error["fields"] == {}
    assert 0 < int(response.headers["Retry-After"]) <= 300
    return error


@pytest.mark.env(ORDER_LIMIT_PER_PHONE="2 per minute")
def test_orders_are_limited_per_normalised_phone(client, wire, settings, redis_client):
    for phone in ("0712345678", "+254 712 345 678"):
        response = client.post("/api/orders", json={**DEMO, "phone": phone})
        assert response.status_code == 201 and "Retry-After" not in response.headers
    error = refused(client.post("/api/orders", json={**DEMO, "phone": "712345678"}), 429, "too_many_requests")
    assert "phone number" in error["message"]
    assert client.post("/api/orders", json={**DEMO, "phone": "0722000000"}).status_code == 201
    # A bad phone is not counted against anyone: it is a 400 that names the field.
    assert client.post("/api/orders", json={**DEMO, "phone": "12"}).status_code == 400
    if settings.get("REDIS_URL"):  # counted in Redis, under this deployment's prefix, for every worker
        assert redis_client.keys(f"{settings['REDIS_PREFIX']}limits:*")


@pytest.mark.env(ORDER_LIMIT_PER_CLIENT="3 per minute", PROXY_HOPS="1")
def test_orders_are_limited_per_client_address_behind_a_proxy(client, wire):
    phones = iter(f"07220000{n:02d}" for n in range(10))

    def order(address):
        return client.post("/api/orders", json={**DEMO, "phone": next(phones)},
                           headers={"X-Forwarded-For": address})

    assert [order("203.0.113.7").status_code for _ in range(3)] == [201] * 3
    assert "connection" in refused(order("203.0.113.7"), 429, "too_many_requests")["message"]
    assert order("203.0.113.8").status_code == 201


@pytest.mark.env(ORDER_LIMIT_PER_CLIENT="2 per minute", PROXY_HOPS="0")
def test_a_forged_forwarded_for_does_not_escape_the_limit_without_a_proxy(client, wire):
    statuses = [client.post("/api/orders", json={**DEMO, "phone": f"07220000{n:02d}"},
                            headers={"X-Forwarded-For": f"198.51.100.{n}"}).status_code for n in range(3)]
    assert statuses == [201, 201, 429]


def test_limits_off_let_load_tests_through(client, wire):
    assert [client.post("/api/orders", json=NO_CALLBACK).status_code for _ in range(6)] == [201] * 6


# -- held waits ----------------------------------------------------------------------------------

def hold(client, order):
    return gevent.spawn(client.get, f"/api/orders/{order['id']}/wait",
                        query_string={"since": order["version"], "timeout": 10})


@pytest.mark.env(WAIT_MAX_PER_ORDER="2")
def test_too_many_waits_on_one_order_is_429(app, client, wire):
    hub = app.extensions[HUB]
    order = client.post("/api/orders", json=NO_CALLBACK).get_json()
    held = [hold(client, order) for _ in range(2)]
    wait_until(lambda: hub.waiter_count == 2, message="two held waits")
    refused(client.get(f"/api/orders/{order['id']}/wait?timeout=10"), 429, "too_many_waiters")
    other = client.post("/api/orders", json=NO_CALLBACK).get_json()
    assert client.get(f"/api/orders/{other['id']}/wait?timeout=0").status_code == 200  # other orders unaffected
    client.post(CALLBACK, json=callback_body(order))
    assert [g.get(timeout=5).get_json()["status"] for g in held] == ["completed"] * 2


@pytest.mark.env(WAIT_MAX_PER_WORKER="2")
def test_a_worker_at_its_waiter_limit_answers_503(app, client, wire):
    hub = app.extensions[HUB]
    orders = [client.post("/api/orders", json=NO_CALLBACK).get_json() for _ in range(3)]
    held = [hold(client, order) for order in orders[:2]]
    wait_until(lambda: hub.waiter_count == 2, message="two held waits")
    refused(client.get(f"/api/orders/{orders[2]['id']}/wait?timeout=10"), 503, "server_busy")
    for order in orders[:2]:
        client.post(CALLBACK, json=callback_body(order))
    assert [g.get(timeout=5).get_json()["status"] for g in held] == ["completed"] * 2
    wait_until(lambda: hub.waiter_count == 0, message="the waits to leave")
    assert client.get(f"/api/orders/{orders[2]['id']}/wait?timeout=0").status_code == 200
