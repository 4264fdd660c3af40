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
    assert order["payment"]["reference"].startswith("SBX_")
    assert order["payment"]["checkout_request_id"].startswith("ws_CO_")
    assert len(order["id"]) >= 22  # 128 random bits, URL-safe base64
    payment = next(r for r in wire.request_history if r.path.endswith("/api/v2/payments"))
    sent = payment.json()
    assert sent["phone_number"] == "254712345678"
    assert sent["external_reference"] == order["id"]
    assert sent["amount"] == 600 and sent["provider"] == "m-pesa"
    assert sent["callback_url"] == "http://eventi.test/api/payhero/callback?token=sandbox"
    assert payment.headers["Authorization"].startswith("Basic ")


@pytest.mark.parametrize("change, field", [
    ({"phone": "0812345678"}, "phone"),
    ({"quantity": 0}, "quantity"),
    ({"quantity": 11}, "quantity"),
    ({"quantity": "2"}, "quantity"),
    ({"email": "not-an-email"}, "email"),
    ({"name": "   "}, "name"),
    ({"name": None}, "name"),
])
def test_bad_fields_are_named_and_nothing_is_sent(client, wire, change, field):
    response = client.post("/api/orders", json={**DEMO, **change})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request" and field in error["fields"]
    assert wire.call_count == 0


def test_missing_fields_are_all_named(client, wire):
    response = client.post("/api/orders", json={})
    assert response.status_code == 400
    assert set(response.get_json()["error"]["fields"]) == {"event", "ticket_type", "quantity", "name", "email", "phone"}


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b""])
def test_a_body_that_is_not_a_json_object_is_400(client, wire, data):
    response = client.post("/api/orders", data=data, content_type="application/json")
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("change, code", [({"event": "nope"}, "event_not_found"), ({"ticket_type": "vip"}, "ticket_type_not_found")])
def test_unknown_event_or_ticket_type_is_404(client, wire, change, code):
    response = client.post("/api/orders", json={**DEMO, **change})
    assert response.status_code == 404 and response.get_json()["error"]["code"] == code
    assert wire.call_count == 0


def test_not_enough_tickets_left_is_409(app, client, wire):
    from eventi_flask.extensions import db
    from eventi_flask.events.models import TicketType

    with app.app_context():
        db.session.execute(db.update(TicketType).values(capacity=TicketType.reserved + 3))
        db.session.commit()
    assert client.post("/api/orders", json={**DEMO, "quantity": 3}).status_code == 201
    response = client.post("/api/orders", json={**DEMO, "quantity": 1})
    assert response.status_code == 409 and response.get_json()["error"]["code"] == "sold_out"


@pytest.mark.parametrize("payhero_answer", [
    {"status_code": 500, "json": {"error_message": "down"}},
    {"status_code": 200, "json": {"success": False, "error_message": "Insufficient float"}},
    {"status_code": 200, "text": "<html>gateway</html>"},
])
def test_payhero_refusal_is_502_and_the_order_is_kept_failed(app, client, wire, payhero_answer):
    wire.post("http://eventi.test/sandbox/payhero/api/v2/payments", **payhero_answer)
    response = client.post("/api/orders", json=DEMO)
    assert response.status_code == 502
    assert response.get_json()["error"]["code"] == "payhero_unavailable"
    order = client.get(f"/api/orders/{response.headers['X-Order-Id']}").get_json()
    assert order["status"] == "failed" and order["payment"]["reference"] is None
    assert wire.call_count == 1  # a payment POST is never retried blindly


def test_payhero_timeout_is_502(client, wire):
    import requests

    wire.post("http://eventi.test/sandbox/payhero/api/v2/payments", exc=requests.ConnectTimeout)
    assert client.post("/api/orders", json=DEMO).status_code == 502


def test_get_order_and_404(client, wire):
    # The phone that never calls back: the sandbox must not complete the order between the two reads.
    order = client.post("/api/orders", json={**DEMO, "phone": "0708000004"}).get_json()
    response = client.get(f"/api/orders/{order['id']}")
    assert response.status_code == 200 and response.get_json() == order
    assert response.headers["Cache-Control"] == "no-store"
    missing = client.get("/api/orders/does-not-exist")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "order_not_found"


def test_unknown_route_and_method_are_json_errors(client):
    assert client.get("/api/nothing").get_json()["error"]["code"] == "not_found"
    response = client.delete("/api/orders")
    assert response.status_code == 405 and "error" in response.get_json()


@pytest.mark.parametrize("path", ["/api/orders/ab%00cd", "/api/events/a%00b", "/api/orders/ab%00cd/wait?timeout=0"])
def test_ids_we_never_issue_are_404_not_a_database_error(client, path):
    assert client.get(path).status_code == 404


def test_a_nul_character_in_a_field_is_named(client, wire):
    response = client.post("/api/orders", json={**DEMO, "name": "Wan\u0000jiku"})
    assert response.status_code == 400 and "name" in response.get_json()["error"]["fields"]
    assert wire.call_count == 0


def test_an_exhausted_database_pool_is_a_retryable_503(client, monkeypatch):
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from eventi_flask.orders import service

    def busy(order_id):
        raise PoolTimeout("QueuePool limit reached")

    monkeypatch.setattr(service, "order_by_id", busy)
    response = client.get("/api/orders/abcdefabcdefabcdef")
    assert response.status_code == 503 and response.headers["Retry-After"] == "2"
    assert response.get_json()["error"]["code"] == "database_unavailable"  # API.md: "answers the same way"


def test_an_unreachable_database_is_a_retryable_503_not_a_500(client, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from eventi_flask.orders import service

    def refused(order_id):
        raise OperationalError("SELECT ...", {}, Exception("connection refused"))

    monkeypatch.setattr(service, "_read_order", refused)
    response = client.get("/api/orders/abcdefabcdefabcdef")
    assert response.status_code == 503 and response.headers["Retry-After"] == "2"
    assert response.get_json()["error"]["code"] == "database_unavailable"
