"""Schemathesis drives every operation of the OpenAPI document against the app, in-process.

Every answer must conform to the document: its status code, headers and body
schema, and never a 500.  Data fitting the document and data that does not
are both sent, to made-up ids and to real ones (the demo event, a completed
and a pending order), with callbacks about those real orders and orders for
the demo event (which the sandbox then pays).  Derandomised
(the same cases every run) and bounded per operation, so a failure
reproduces and the run stays short.
"""
import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from eventi_flask.line import service as line
from eventi_flask.orders.service import body_hash
from tests.support import DEMO, wait_until

FUZZ = settings(max_examples=30, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))
# What a request the document allows may still get, because of what the database holds:
# unknown ids, sold out, an amount that does not match the order, limits, PayHero refusing.
# Never 400: the document says exactly what is well formed.
CONFIG = schemathesis.config.SchemathesisConfig.from_dict({"checks": {"positive_data_acceptance": {
    "expected-statuses": ["2xx", "404", "409", "422", "429", "502", "503"]}}})
NEVER_ANSWERED = "0708000004"  # the sandbox sends no callback: the order stays pending


def _real_orders(client):
    completed = client.post("/api/orders", json=DEMO).get_json()
    pending = client.post("/api/orders", json={**DEMO, "phone": NEVER_ANSWERED}).get_json()
    wait_until(lambda: client.get(f"/api/orders/{completed['id']}").get_json()["status"] == "completed",
               message="the sandbox's callback")
    return [completed["id"], pending["id"]]


def _real_place(app):
    """A place in the demo event's line, as a POST past capacity would have taken it."""
    with app.test_request_context():
        data = {**DEMO, "phone": "254712345678"}
        place = {"id": line.new_place_id(DEMO["event"]), "body": json.dumps(data), "body_hash": body_hash(data),
                 "order_key": "fuzz", "type": DEMO["ticket_type"], "quantity": 1}
        _, joined, _ = line.get_line().store.join(DEMO["event"], place, None, 0, False, True)
    return joined.id


def _about(order_id):
    """Point a generated callback body at a real order (still a body the document allows)."""
    def point(body):
        if isinstance(body, dict):
            target = body["response"] if isinstance(body.get("response"), dict) else body
            target["ExternalReference" if target is not body else "external_reference"] = order_id
    return point


def _for_the_demo_event(body):
    """Point a generated order at the demo event, so that it is made (and paid, in the sandbox)."""
    if isinstance(body, dict):
        body.update(event=DEMO["event"], ticket_type=DEMO["ticket_type"])


def _runs(operation, mode, order_ids, place_id):
    """(path parameters, change to the body) for each run over `operation`."""
    runs = [({}, None)]
    if "{place_id}" in operation.path:
        runs.append(({"place_id": place_id}, None))
    if "{slug}" in operation.path:
        runs.append(({"slug": DEMO["event"]}, None))
    if "{order_id}" in operation.path:
        runs += [({"order_id": order_id}, None) for order_id in order_ids]
    if mode is GenerationMode.POSITIVE:  # a change to a negative case might make it valid
        if operation.path == "/api/payhero/callback":
            runs += [({}, _about(order_id)) for order_id in order_ids]
        if operation.path == "/api/orders":
            runs.append(({}, _for_the_demo_event))
    return runs


def _fuzz(operation, mode, query, path_parameters, change_body, failures):
    strategy = operation.as_strategy(generation_mode=mode, query=query, path_parameters=path_parameters or None)

    @FUZZ
    @given(case=strategy)
    def run(case):
        if change_body is not None:
            change_body(case.body)
        case.call_and_validate()

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE, f"{operation.label}: no valid request can be made"
        # Nothing in it can be made invalid (no body, no query, any string for the path): nothing to send.
    except Exception as exc:  # a failed check: note it and carry on with the other operations
        failures.append(f"{operation.label} {path_parameters} ({mode.value}): {exc}")


# A short hold: a generated wait on the pending order answers within a fraction of a second.
@pytest.mark.env(WAIT_TIMEOUT_MAX="0.2", WAIT_TIMEOUT_DEFAULT="0.2")
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda mode: mode.value)
def test_every_operation_answers_as_documented(app, client, wire, mode):
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app, config=CONFIG)
    token = {"token": app.config["PAYHERO_CALLBACK_TOKEN"]}  # else every callback stops at 401
    order_ids = _real_orders(client)
    operations = [result.ok() for result in schema.get_all_operations()]
    # All of them but GET /api/openapi.json itself, which schemathesis leaves out (test_openapi.py covers it).
    place_id = _real_place(app)
    assert len(operations) == 9
    failures = []
    for operation in operations:
        query = token if operation.path == "/api/payhero/callback" else None
        for path_parameters, change_body in _runs(operation, mode, order_ids, place_id):
            _fuzz(operation, mode, query, path_parameters, change_body, failures)
    assert not failures, "\n\n".join(failures)
