"""The orders API over both backends: SQLite with the in-process hub, PostgreSQL with Redis."""
import pytest

from tests.support import DEMO


def test_event_lists_ticket_types_with_prices(client):
    response = client.get("/api/events/test-this-end-to-end")
    assert response.status_code == 200
    body = response.get_json()
    assert body["currency"] == "KES"
    assert [(t["id"], t["price"]) for t in body["ticket_types"]] == [("early-bird", 300), ("regular", 500)]
    assert all(t["available"] >= 100_000 for t in body["ticket_types"])


def test_unknown_event_is_404_json(client):
    response = client.get("/api/events/nope")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "event_not_found"


def test_create_order_sends_stk_push_and_returns_pending_order(client, wire):
    response = client.post("/api/orders", json={**DEMO, "quantity": 2, "phone": "+254712345678"})
    assert response.status_code == 201, response.get_json()
    order = response.get_json()
    assert response.headers["Location"] == f"/api/orders/{order['id']}"
    assert order["status"] == "pending"
    assert order["amount"] == 600 and order["currency"] == "KES"
    assert order["phone"] == "2547******78"
    assert order["payment"]["reference"].startswith("SBX-")
    assert order["payment"]["checkout_request_id"].startswith("ws_CO_")
    assert len(order["id"]) >= 22  # 128 random bits, URL-safe base64
    payment = next(r for r in wire.request_history if r.path.endswith("/api/v2/payments"))
    sent = payment.json()
    assert sent["phone_number"] == "254712345678"
    assert sent["external_reference"] == order["id"]
    assert sent["amount"] == 600 and sent["provider"] == "m-pesa"
    assert sent["callback_url"] == "http://eventi.test/api/payhero/callback?token=sandbox"
    assert payment.headers["Authorization"].startswith("Basic ")
