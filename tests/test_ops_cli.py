"""The on-call commands: orders show, orders stuck, callbacks replay (SQLite and PostgreSQL)."""
import json

import gevent
import pytest
import requests_mock

from eventi_flask.orders.reconcile import reconcile
from tests.conftest import PUBLIC
from tests.support import DEMO, callback_body, wait_until

TOKEN = "?token=sandbox"
pytestmark = pytest.mark.env(RECONCILE_AFTER="0")  # reconcile checks every pending order at once


def _order(client, phone, final=True):
    order = client.post("/api/orders", json={**DEMO, "phone": phone}).get_json()
    if final:
        wait_until(lambda: client.get(f"/api/orders/{order['id']}").get_json()["status"] != "pending",
                   message=f"the sandbox's callback for {phone}")
    return client.get(f"/api/orders/{order['id']}").get_json()


def _callback(client, body, token=TOKEN):
    return client.post("/api/payhero/callback" + token, json=body)


@pytest.fixture
def shop(app, client, wire):
    """Orders in every state, with callbacks of every outcome."""
    completed = _order(client, "0712345678")
    assert _callback(client, callback_body(completed)).status_code == 200  # a repeat
    assert _callback(client, callback_body(completed, result_code=1, shape="flat")).status_code == 200  # late failure
    cancelled = _order(client, "0708000001")
    failed = _order(client, "0708000002")
    pending = _order(client, "0708000004", final=False)
    paid = callback_body(pending)
    assert _callback(client, paid, token="?token=rotated-away").status_code == 401
    assert _callback(client, {"response": {"ResultCode": "zero", "ExternalReference": pending["id"]}}).status_code == 400
    assert _callback(client, callback_body(pending, amount=1)).status_code == 422
    with app.app_context():
        assert reconcile()["still_pending"] == 1  # PayHero says QUEUED: it never answered
    wire.register_uri("POST", PUBLIC + "/sandbox/payhero/api/v2/payments", status_code=500, text="PayHero is down")
    refused = client.post("/api/orders", json={**DEMO, "phone": "0712000111"})
    assert refused.status_code == 502
    return {"completed": completed, "cancelled": cancelled, "failed": failed, "pending": pending,
            "refused": client.get(f"/api/orders/{refused.headers['X-Order-Id']}").get_json()}


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()
    return lambda *args: runner.invoke(args=list(args))


def _lines(result):
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def _line(lines, *words):
    """The one line that holds all `words`."""
    found = [line for line in lines if all(word in line for word in words)]
    assert len(found) == 1, f"{words} in one line of:\n" + "\n".join(lines)
    return found[0]


def test_show_tells_each_event_of_an_order(shop, cli):
    completed = shop["completed"]
    lines = _lines(cli("orders", "show", completed["id"]))
    assert lines[0].startswith(f"Order {completed['id']}: completed, KES 300") and "2547******78" in lines[0]
    assert "KES 300 for 1 x early-bird" in lines[1] and "created" in lines[1]
    _line(lines, "STK push", "PayHero accepted it", completed["payment"]["reference"])
    _line(lines, "callback #", "classic, result code 0", "-> applied")
    _line(lines, "callback #", "repeat, nothing changed")
    _line(lines, "callback #", "flat, 'The balance is insufficient", "ignored: the order was already final")
    _line(lines, "completed", completed["payment"]["receipt"], completed["tickets"][0]["code"])
    assert "254712345678" not in "\n".join(lines)  # the phone masked, as the API masks it

    lines = _lines(cli("orders", "show", shop["pending"]["id"]))
    _line(lines, "callback #", "wrong or missing token, not applied")
    _line(lines, "callback #", "result code 'zero'", "bad input", "response.ResultCode")
    _line(lines, "callback #", "amount mismatch, not applied")
    _line(lines, "reconcile", "transaction-status QUEUED -> still pending")
    assert "still pending (version 2)" in lines[-1]  # how it stands, last

    lines = _lines(cli("orders", "show", shop["refused"]["id"]))
    _line(lines, "STK push", "PayHero refused it: PayHero answered 500", "PayHero is down")
    _line(lines, "failed", "The payment could not be started")
    _line(_lines(cli("orders", "show", shop["cancelled"]["id"])), "cancelled", "result code 1032:")
    _line(_lines(cli("orders", "show", shop["failed"]["id"])), "failed", "result code 1:")


def test_show_finds_orders_by_receipt_and_by_phone(shop, cli):
    completed = shop["completed"]
    by_receipt = _lines(cli("orders", "show", completed["payment"]["receipt"]))
    assert by_receipt[0].startswith(f"Order {completed['id']}:")
    # A receipt only in a callback (here the pending order's, refused for its token) finds that order too.
    histories = json.loads(cli("orders", "show", shop["pending"]["id"], "--json").output)
    refused = next(entry for entry in histories[0]["timeline"] if entry.get("outcome") == "unauthorized")
    assert _lines(cli("orders", "show", refused["receipt"]))[0].startswith(f"Order {shop['pending']['id']}:")
    by_phone = _lines(cli("orders", "show", "+254 708 000 004"))
    assert by_phone[0].startswith(f"Order {shop['pending']['id']}:")
    histories = json.loads(cli("orders", "show", "0712345678", "--json").output)
    assert [history["order"]["id"] for history in histories] == [completed["id"]]
    events = [entry["event"] for entry in histories[0]["timeline"]]
    # PayHero's callback may come before its answer to the STK push (so the sandbox, at 50 ms).
    # "message": its SMS (the sandbox's, SMS_MODE's default), queued when it completed.
    assert events[0] == "created" and sorted(events[1:]) == ["callback"] * 3 + ["message", "status", "stk_push"]
    outcomes = [entry["outcome"] for entry in histories[0]["timeline"] if entry["event"] == "callback"]
    assert outcomes == ["applied", "repeat", "ignored_final"]
    assert histories[0]["order"]["phone"] == "2547******78"


def test_stuck_lists_pending_orders_past_an_age(shop, cli):
    lines = _lines(cli("orders", "stuck", "--older-than", "0s"))
    assert lines[0] == "1 order(s) pending for more than 0s, oldest first:"
    row = _line(lines, shop["pending"]["id"])
    assert "KES 300" in row and "2547******04" in row and shop["pending"]["payment"]["reference"] in row
    assert row.endswith("3: unauthorized, invalid, amount_mismatch")
    assert _lines(cli("orders", "stuck")) == ["No order has been pending for more than 10m."]
    assert json.loads(cli("orders", "stuck", "--older-than", "0", "--json").output)[0]["id"] == shop["pending"]["id"]


def test_replay_applies_a_stored_callback_once_and_wakes_waiters(shop, cli, client):
    pending = shop["pending"]
    histories = json.loads(cli("orders", "show", pending["id"], "--json").output)
    refused = next(entry for entry in histories[0]["timeline"] if entry.get("outcome") == "unauthorized")
    waiter = gevent.spawn(client.get, f"/api/orders/{pending['id']}/wait?since={pending['version']}&timeout=10")

    first = cli("callbacks", "replay", str(refused["id"]))
    assert first.exit_code == 0, first.output
    assert f"Callback #{refused['id']} replayed as #" in first.output and "(applied)" in first.output
    assert f"order {pending['id']} is completed" in first.output
    woken = waiter.get(timeout=10)
    assert woken.get_json()["status"] == "completed"

    second = cli("callbacks", "replay", str(refused["id"]))
    assert second.exit_code == 0 and "(repeat)" in second.output, second.output
    after = client.get(f"/api/orders/{pending['id']}").get_json()
    assert after["version"] == woken.get_json()["version"] and len(after["tickets"]) == 1  # nothing changed twice
    lines = _lines(cli("orders", "show", pending["id"]))
    _line(lines, f"(replay of #{refused['id']})", "-> applied")
    _line(lines, f"(replay of #{refused['id']})", "-> repeat")


def test_a_replay_that_is_refused_exits_non_zero(shop, cli):
    histories = json.loads(cli("orders", "show", shop["pending"]["id"], "--json").output)
    mismatch = next(entry for entry in histories[0]["timeline"] if entry.get("outcome") == "amount_mismatch")
    result = cli("callbacks", "replay", str(mismatch["id"]))
    assert result.exit_code == 1
    assert "(amount_mismatch): 422 The payment amount (1) does not match the order (300)." in result.output


@pytest.mark.parametrize("backend", ["sqlite-local"], indirect=True)
@pytest.mark.parametrize("args, message", [
    (["orders", "show", "no-such-order"], "No order with the id, M-Pesa receipt or phone 'no-such-order'."),
    (["orders", "show", ""], "No order with the id, M-Pesa receipt or phone ''."),
    (["orders", "show", "-Sx"], "No order with the id, M-Pesa receipt or phone '-Sx'."),  # ids may begin with -
    (["orders", "stuck", "--older-than", "ten minutes"], "--older-than must look like 90s, 10m, 2h or 1d, got 'ten minutes'."),
    (["callbacks", "replay", "12x"], "A callback id is a number (see `orders show`), got '12x'."),
    (["callbacks", "replay", "999999"], "No stored callback #999999."),
])
def test_bad_input_exits_non_zero_with_one_clear_line(cli, args, message):
    result = cli(*args)
    assert result.exit_code == 1
    assert result.output == f"Error: {message}\n"
