"""Putting an event on sale from a file (flask events import | list | show) and the API's sales rules,
over both backends: SQLite, and PostgreSQL with Redis."""
from datetime import datetime

import pytest

from tests.support import DEMO, event_file, toml, wait_until, when

SLUG = event_file()["event"]["slug"]


@pytest.fixture
def importer(app, tmp_path):
    """importer(data or text) -> (exit code, output lines) of `flask events import FILE`."""
    runner = app.test_cli_runner()

    def run(data):
        path = tmp_path / "event.toml"
        path.write_text(data if isinstance(data, str) else toml(data))
        result = runner.invoke(args=["events", "import", str(path)])
        return result.exit_code, result.output.splitlines()

    return run


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()

    def run(*args):
        result = runner.invoke(args=list(args))
        assert result.exit_code == 0, result.output
        return result.output.splitlines()

    return run


def imported(importer, data):
    code, lines = importer(data)
    assert code == 0, lines
    return lines


def order(client, quantity=1, ticket_type="vip", phone="0712345678"):
    return client.post("/api/orders", json={**DEMO, "event": SLUG, "ticket_type": ticket_type,
                                            "quantity": quantity, "phone": phone})


def test_import_puts_the_event_on_sale_as_the_file_says(client, importer):
    data = event_file()
    assert imported(importer, data) == [f"{SLUG}: created (2 ticket types). Checkout: /events/{SLUG}/checkout"]
    body = client.get(f"/api/events/{SLUG}").get_json()
    moment = lambda iso: datetime.fromisoformat(iso.replace("Z", "+00:00"))  # noqa: E731
    assert (body["name"], body["venue"], body["currency"]) == ("Sauti Live", "Uhuru Gardens, Nairobi", "KES")
    for name in ("starts_at", "sales_start", "sales_end"):
        assert moment(body[name]) == moment(data["event"][name])
    assert body["on_sale"] is True
    assert body["ticket_types"] == [
        {"id": "regular", "name": "Regular", "price": 1500, "available": 200, "max_per_order": 10},
        {"id": "vip", "name": "VIP", "price": 5000, "available": 5, "max_per_order": 4}]


def test_importing_the_same_file_twice_changes_nothing(client, importer):
    data = event_file()
    imported(importer, data)
    before = client.get(f"/api/events/{SLUG}").get_json()
    again = imported(importer, data)
    assert len(again) == 1 and again[0].startswith(f"{SLUG}: already as ") and again[0].endswith("; nothing changed.")
    assert client.get(f"/api/events/{SLUG}").get_json() == before


def test_a_changed_file_updates_the_event_to_match(client, importer, wire):
    imported(importer, event_file())
    assert order(client, ticket_type="regular").status_code == 201
    changed = event_file(name="Sauti Live 2027", ticket_types=[
        {"id": "regular", "name": "Regular", "price": 2000, "quantity": 300, "max_per_order": 6},
        {"id": "student", "name": "Student", "price": 800, "quantity": 50}])  # vip had no orders: it may go
    lines = imported(importer, changed)
    assert lines[0].startswith(f"{SLUG}: updated (")
    for change in ("name", "regular.price", "regular.quantity", "regular.max_per_order", "student added", "vip removed"):
        assert change in lines[0]
    body = client.get(f"/api/events/{SLUG}").get_json()
    assert body["name"] == "Sauti Live 2027"
    assert body["ticket_types"] == [
        {"id": "student", "name": "Student", "price": 800, "available": 50, "max_per_order": 10},
        {"id": "regular", "name": "Regular", "price": 2000, "available": 299, "max_per_order": 6}]


def _without(section, name):
    data = event_file()
    (data["event"] if section == "event" else data["ticket_types"][0]).pop(name)
    return data


def _with(section, **values):
    data = event_file()
    (data["event"] if section == "event" else data["ticket_types"][0]).update(values)
    return data


@pytest.mark.parametrize("data, problem", [
    (_without("event", "venue"), "event.venue: Missing data for required field."),
    (_without("ticket", "price"), 'ticket_types[1] ("vip").price: Missing data for required field.'),
    (_with("event", slug="Sauti Live"), "event.slug: Use only a-z, 0-9 and -."),
    (_with("event", starts_at="2027-02-14 19:00"), "event.starts_at: Give a date and time with an offset"),
    (_with("event", sales_start=when(days=40)), "event.sales_end: Sales must open before they close"),
    (_with("ticket", price=0), 'ticket_types[1] ("vip").price: Must be whole KES above 0.'),
    (_with("ticket", price="5000"), 'ticket_types[1] ("vip").price: Not a valid integer.'),
    (_with("ticket", quantity=-1), 'ticket_types[1] ("vip").quantity: Must be 0 or more.'),
    (_with("ticket", max_per_order=11), 'ticket_types[1] ("vip").max_per_order: Must be 1 to 10.'),
    (_with("ticket", id="regular"), """ticket_types[2] ("regular").id: 'regular' is used twice."""),
    (_with("ticket", prise=5000), 'ticket_types[1] ("vip").prise: Unknown field.'),
    ({"event": event_file()["event"], "ticket_types": []}, "ticket_types: Missing data for required field."),
    ("ticket_types = []\n" + toml({"event": event_file()["event"], "ticket_types": []}),
     "ticket_types: List at least one [[ticket_types]]."),
    ("[event\nslug = 1", "is not valid TOML"),
])
def test_a_bad_file_is_refused_in_one_line_and_nothing_changes(client, importer, data, problem):
    imported(importer, event_file())
    before = client.get(f"/api/events/{SLUG}").get_json()
    code, lines = importer(data)
    assert code != 0 and len(lines) == 1 and problem in lines[0], lines
    assert client.get(f"/api/events/{SLUG}").get_json() == before


def test_a_quantity_below_the_tickets_held_is_refused(client, importer, wire):
    imported(importer, event_file())
    assert order(client, quantity=3).status_code == 201  # pending or paid, they are held
    code, lines = importer(_with("ticket", quantity=2, price=4000))
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and lines[0].endswith(
        ': refused, nothing changed: ticket type "vip": quantity 2 is below the 3 tickets already held (paid or pending).')
    vip = client.get(f"/api/events/{SLUG}").get_json()["ticket_types"][1]
    assert (vip["price"], vip["available"]) == (5000, 2)
    imported(importer, _with("ticket", quantity=3))  # down to what is held is allowed
    assert client.get(f"/api/events/{SLUG}").get_json()["ticket_types"][1]["available"] == 0


def test_removing_a_ticket_type_that_has_orders_is_refused(client, importer, wire):
    imported(importer, event_file())
    assert order(client, phone="0708000001").status_code == 201  # cancelled: it still has an order
    wait_until(lambda: client.get(f"/api/events/{SLUG}").get_json()["ticket_types"][1]["available"] == 5,
               message="the cancellation to free the ticket")
    data = event_file()
    data["ticket_types"] = data["ticket_types"][1:]
    code, lines = importer(data)
    assert code == 1 and len(lines) == 1 and 'ticket type "vip" has orders, so it cannot be removed' in lines[0]
    assert [t["id"] for t in client.get(f"/api/events/{SLUG}").get_json()["ticket_types"]] == ["regular", "vip"]


def test_list_and_show_tell_how_an_event_sells(client, importer, cli, wire):
    imported(importer, event_file())
    imported(importer, {**event_file(slug="later", sales_start=when(days=1)), "ticket_types": [
        {"id": "regular", "name": "Regular", "price": 100, "quantity": 10}]})
    paid = order(client, quantity=2).get_json()
    wait_until(lambda: client.get(f"/api/orders/{paid['id']}").get_json()["status"] == "completed",
               message="the sandbox's success")
    assert order(client, quantity=1, phone="0708000004").status_code == 201  # never answered: pending
    assert order(client, quantity=1, ticket_type="regular", phone="0708000002").status_code == 201  # fails
    wait_until(lambda: client.get(f"/api/events/{SLUG}").get_json()["ticket_types"][0]["available"] == 200,
               message="the failure to free its ticket")

    listed = cli("events", "list")
    assert listed[0].startswith(f"{SLUG} ") and "on sale" in listed[0] and "Uhuru Gardens" in listed[0]
    assert "sales open " in listed[1] and "EAT" in listed[1]
    later = next(line for line in listed if line.startswith("later "))
    assert "not on sale yet" in later
    assert any(line.startswith("test-this-end-to-end ") for line in listed)

    shown = cli("events", "show", SLUG)
    assert shown[0].startswith("Sauti Live (sauti-live), Uhuru Gardens, Nairobi")
    assert shown[2].split() == ["TICKET", "TYPE", "PRICE", "QUANTITY", "SOLD", "PENDING", "AVAILABLE", "REVENUE",
                                "MAX/ORDER"]
    rows = {line.split()[0]: line.split()[1:] for line in shown[3:]}
    assert rows["vip"] == ["5,000", "5", "2", "1", "2", "10,000", "4"]
    assert rows["regular"] == ["1,500", "200", "0", "0", "200", "0", "10"]
    assert rows["all"] == ["2", "1", "10,000"]


def test_show_of_an_unknown_event_is_one_line(app):
    result = app.test_cli_runner().invoke(args=["events", "show", "nope"])
    assert result.exit_code == 1 and result.output.splitlines() == [
        "Error: No event called 'nope' (see `flask events list`)."]


# -- the API's sales rules --

@pytest.mark.parametrize("window, code, message", [
    ({"sales_start": when(days=2)}, "sales_not_open", "Sales open on "),
    ({"sales_start": when(days=-3), "sales_end": when(days=-1)}, "sales_closed", "Sales for this event have closed."),
])
def test_orders_outside_the_sales_window_are_409(client, importer, wire, window, code, message):
    imported(importer, event_file(**window))
    assert client.get(f"/api/events/{SLUG}").get_json()["on_sale"] is False
    response = order(client)
    assert response.status_code == 409, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code and error["message"].startswith(message)
    assert client.get(f"/api/events/{SLUG}").get_json()["ticket_types"][1]["available"] == 5  # nothing held
    assert wire.call_count == 0  # no STK push


def test_a_quantity_above_the_types_max_per_order_is_400(client, importer, wire):
    imported(importer, event_file())
    response = order(client, quantity=5)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request" and error["fields"] == {"quantity": "Choose at most 4 VIP tickets."}
    assert wire.call_count == 0
    assert order(client, quantity=4).status_code == 201


def test_sold_out_still_answers_409_sold_out(client, importer, wire):
    imported(importer, event_file())
    assert order(client, quantity=4).status_code == 201
    response = order(client, quantity=2)
    assert response.status_code == 409 and response.get_json()["error"]["code"] == "sold_out"
    assert client.get(f"/api/events/{SLUG}").get_json()["ticket_types"][1]["available"] == 1
