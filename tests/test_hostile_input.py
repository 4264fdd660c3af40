"""Hostile or broken input: start-up without the callback token, oversized and non-JSON bodies,
one callback sent 50 times at once, and property-based tests of the parsers and routes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import gevent
import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from marshmallow import ValidationError
from sqlalchemy import func, select

from config import Config, ConfigError
from eventi_flask.extensions import db
from eventi_flask.orders.models import Order, Ticket
from eventi_flask.orders.schemas import OrderCreateSchema
from eventi_flask.orders.state import PaymentOutcome
from eventi_flask.payhero import service as callbacks
from eventi_flask.payhero.models import PayheroCallback
from eventi_flask.payhero.schemas import parse_callback
from tests.support import DEMO, ROOT, callback_body, free_port

CALLBACK = "/api/payhero/callback?token=sandbox"
NO_CALLBACK = {**DEMO, "phone": "0708000004"}
LIVE_WITHOUT_TOKEN = {"PAYHERO_MODE": "live", "SECRET_KEY": "s", "PAYHERO_API_USERNAME": "user", "PAYHERO_API_PASSWORD": "secret",
                      "PAYHERO_CHANNEL_ID": "42"}


def error_shape(response):
    body = response.get_json()
    assert set(body) == {"error"} and {"code", "message", "fields"} <= set(body["error"]), body
    return body["error"]


# -- start-up refusal --------------------------------------------------------------------------

def test_live_mode_requires_the_callback_token():
    with pytest.raises(ConfigError, match="PAYHERO_CALLBACK_TOKEN"):
        Config(LIVE_WITHOUT_TOKEN)
    assert Config({**LIVE_WITHOUT_TOKEN, "PAYHERO_CALLBACK_TOKEN": "t0ken"}).PAYHERO_CALLBACK_TOKEN == "t0ken"


def _run(command, tmp_path, timeout=30):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYHERO_", "DATABASE_URL", "REDIS_"))}
    env.update(LIVE_WITHOUT_TOKEN, PORT=str(free_port()), DATABASE_URL=f"sqlite:///{tmp_path}/refused.sqlite3",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [
    ["flask", "--app", "wsgi", "seed-demo"],
    ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
], ids=["flask", "gunicorn"])
def test_live_mode_without_the_token_refuses_to_start_in_one_line(command, tmp_path):
    result = _run(command, tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "PAYHERO_CALLBACK_TOKEN" in line]
    assert errors == ["Configuration error: PAYHERO_CALLBACK_TOKEN is required but not set"], output


# -- bodies: too large, not JSON, nested too deep ------------------------------------------------

@pytest.mark.parametrize("path", [CALLBACK, "/api/orders"])
def test_bodies_over_64_kb_are_413(client, path):
    response = client.post(path, data=json.dumps({"padding": "x" * 70_000}), content_type="application/json")
    assert response.status_code == 413
    assert error_shape(response)["code"] == "request_entity_too_large"


def test_a_body_just_under_the_limit_is_read(client):
    body = json.dumps({**NO_CALLBACK, "name": "x" * 60_000})
    response = client.post("/api/orders", data=body, content_type="application/json")
    assert response.status_code == 400 and "name" in error_shape(response)["fields"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_callback_that_is_not_json_is_415(client, content_type):
    response = client.post(CALLBACK, data=json.dumps({"status": True}), content_type=content_type)
    assert response.status_code == 415 and error_shape(response)["code"] == "unsupported_media_type"


@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe", b"[" * 50_000, b'{"a":' * 12_000, b"null", b"[]"])
def test_broken_json_is_400_on_both_routes(client, body):
    for path in (CALLBACK, "/api/orders"):
        response = client.post(path, data=body, content_type="application/json")
        assert response.status_code == 400, (path, body[:20], response.get_json())
        error_shape(response)


def test_brackets_inside_strings_are_not_nesting(client, wire):
    # Deep nesting is refused before parsing (json_provider.py); a string full of brackets is not nesting.
    response = client.post("/api/orders", json={**NO_CALLBACK, "name": "[{" * 100})
    assert response.status_code == 201, response.get_json()


def test_an_order_sent_as_a_form_is_400(client):
    response = client.post("/api/orders", data=NO_CALLBACK)
    assert response.status_code == 400 and error_shape(response)["code"] == "invalid_json"


@pytest.mark.parametrize("shape, field, value", [
    ("classic", "ResultCode", 2**31), ("classic", "ResultCode", -2**63), ("flat", "result_code", 10**20),
    ("classic", "MpesaReceiptNumber", "R" * 101), ("flat", "provider_reference", "R" * 101),
])
def test_values_past_what_the_columns_hold_are_400_not_500(client, wire, shape, field, value):
    order = client.post("/api/orders", json=NO_CALLBACK).get_json()
    body = callback_body(order, shape=shape)
    (body["response"] if shape == "classic" else body)[field] = value
    response = client.post(CALLBACK, json=body)
    assert response.status_code == 400 and field in json.dumps(error_shape(response)["fields"])
    assert client.get(f"/api/orders/{order['id']}").get_json()["status"] == "pending"


# -- the same callback, 50 times at once ----------------------------------------------------------

@pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
def test_fifty_identical_callbacks_at_once_are_applied_exactly_once(app, client, wire, monkeypatch):
    order = client.post("/api/orders", json={**NO_CALLBACK, "quantity": 3}).get_json()
    body = json.dumps(callback_body(order))
    in_flight, most = [0], [0]
    handle = callbacks.handle_callback

    def counting(*args, **kwargs):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            return handle(*args, **kwargs)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(callbacks, "handle_callback", counting)

    def send():
        return app.test_client().post(CALLBACK, data=body, content_type="application/json")

    responses = [greenlet.get() for greenlet in gevent.joinall([gevent.spawn(send) for _ in range(50)], timeout=60)]
    assert len(responses) == 50
    assert most[0] > 10, "the callbacks did not overlap"
    assert [r.status_code for r in responses] == [200] * 50
    assert {r.get_json()["status"] for r in responses} == {"completed"}
    with app.app_context():
        stored = db.session.get(Order, order["id"])
        assert stored.status == "completed" and stored.version == order["version"] + 1
        assert db.session.scalar(select(func.count()).select_from(Ticket).where(Ticket.order_id == order["id"])) == 3
        outcomes = db.session.execute(
            select(PayheroCallback.outcome, func.count()).group_by(PayheroCallback.outcome)).all()
        assert dict(outcomes) == {"applied": 1, "repeat": 49}


# -- property-based: no input gives a 500 -------------------------------------------------------

EDGES = st.sampled_from([0, -1, 1032, 2**31 - 1, 2**31, -2**31 - 1, 2**63, 10**20, 1e300, -0.0, 300.5, "", "0", True])
JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
                | st.floats(allow_nan=False) | st.text(max_size=30) | EDGES)
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
CLASSIC_KEYS = ["Amount", "CheckoutRequestID", "ExternalReference", "MerchantRequestID", "MpesaReceiptNumber",
                "Phone", "ResultCode", "ResultDesc", "Status"]
FLAT_KEYS = ["success", "status", "message", "reference", "external_reference", "amount", "currency",
             "provider_reference", "result_code"]


def shaped(keys, values):
    """Dicts with the real field names and any JSON values (the fields the schemas must survive)."""
    return st.dictionaries(st.sampled_from(keys), values, max_size=len(keys))


# Fields of a real callback replaced, by values of about the right type (edge cases first) or by anything.
INTS = EDGES | st.integers(min_value=-2**64, max_value=2**64)
TEXTS = st.text(max_size=20) | st.integers(0, 300).map(lambda n: "R" * n)  # past the columns' lengths too


def replaced(ints, keys):
    fields = {key: (INTS if key in ints else TEXTS) | JSON for key in keys}
    return st.fixed_dictionaries({}, optional=fields)


CALLBACK_BODIES = (
    JSON
    | st.builds(lambda status, response: {"status": status, "response": response}, JSON, shaped(CLASSIC_KEYS, JSON))
    | shaped(FLAT_KEYS, JSON)
)
ORDER_BODIES = JSON | shaped(["event", "ticket_type", "quantity", "name", "email", "phone"], JSON)
PROPERTY = hypothesis_settings(max_examples=300, deadline=None,
                               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ROUTE_PROPERTY = hypothesis_settings(PROPERTY, max_examples=100)


@PROPERTY
@given(CALLBACK_BODIES)
def test_parse_callback_answers_an_outcome_or_a_validation_error(body):
    try:
        outcome = parse_callback(body)
    except ValidationError:
        return
    assert isinstance(outcome, PaymentOutcome)
    assert outcome.order_id or outcome.reference or outcome.checkout_request_id


@PROPERTY
@given(ORDER_BODIES)
def test_the_order_schema_answers_an_order_or_a_validation_error(body):
    try:
        data = OrderCreateSchema().load(body)
    except ValidationError as err:
        assert isinstance(err.messages, (dict, list, str))
        return
    assert 1 <= data["quantity"] <= 10 and data["phone"].startswith("254") and len(data["phone"]) == 12


@pytest.mark.parametrize("backend", ["sqlite-local"], indirect=True)
@ROUTE_PROPERTY
@given(body=ORDER_BODIES | st.builds(lambda changes: {**NO_CALLBACK, **changes},
                                     shaped(["event", "ticket_type", "quantity", "name", "email", "phone"], JSON)))
def test_order_creation_never_answers_500(client, wire, body):
    response = client.post("/api/orders", json=body)
    assert response.status_code in (201, 400, 404, 409), (body, response.get_json())
    if response.status_code != 201:
        error_shape(response)


@pytest.fixture
def fuzz_order(client, wire):
    return client.post("/api/orders", json=NO_CALLBACK).get_json()


@pytest.mark.parametrize("backend", ["sqlite-local", "postgres-redis"], indirect=True)
@pytest.mark.parametrize("shape", ["classic", "flat"])
@ROUTE_PROPERTY
@given(classic=replaced({"Amount", "ResultCode"}, CLASSIC_KEYS), flat=replaced({"amount", "result_code"}, FLAT_KEYS),
       content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", ""]))
def test_the_callback_route_never_answers_500(client, wire, shape, classic, flat, content_type):
    """A real callback for a fresh pending order, with some of its fields replaced."""
    order = client.post("/api/orders", json=NO_CALLBACK).get_json()
    real = callback_body(order, shape=shape)
    body = {**real, "response": {**real["response"], **classic}} if shape == "classic" else {**real, **flat}
    assert_callback_answer(client, body, content_type)


@pytest.mark.parametrize("backend", ["sqlite-local"], indirect=True)
@ROUTE_PROPERTY
@given(body=CALLBACK_BODIES, content_type=st.sampled_from(["application/json", "text/plain"]))
def test_the_callback_route_never_answers_500_to_any_json(client, body, content_type):
    assert_callback_answer(client, body, content_type)


def assert_callback_answer(client, body, content_type):
    response = client.post(CALLBACK, data=json.dumps(body), content_type=content_type)
    assert response.status_code in (200, 400, 404, 409, 415, 422), (body, response.get_json())
    if response.status_code != 200:
        error_shape(response)


@pytest.mark.parametrize("backend", ["sqlite-local"], indirect=True)
@pytest.mark.env(WAIT_TIMEOUT_MAX="0.01", WAIT_TIMEOUT_DEFAULT="0.01")
@ROUTE_PROPERTY
@given(timeout=st.none() | st.text(max_size=12) | st.floats().map(str), since=st.none() | st.text(max_size=12)
       | st.integers(min_value=-2**70, max_value=2**70).map(str), known=st.booleans())
def test_the_wait_route_never_answers_500(client, fuzz_order, timeout, since, known):
    params = {name: value for name, value in (("timeout", timeout), ("since", since)) if value is not None}
    order_id = fuzz_order["id"] if known else "no-such-order"
    response = client.get(f"/api/orders/{order_id}/wait", query_string=params)
    assert response.status_code in (200, 400, 404), (params, response.get_json())
