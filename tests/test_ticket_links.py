"""The ticket link, GET /t/<token>: signed, bound to its order, and the tickets on a phone.

API.md "Tickets delivered": the page shows the event and each ticket's code and QR, is never
cached, and anything but a token we signed is the same 404 as an unknown order.
"""
import json
import re

import pytest
import requests
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import expect

from eventi_flask.orders.models import new_order_id
from eventi_flask.web import ticket_links
from tests.support import DEMO, callback_body, post_callback, wait_until
from tests.test_event_pages import decoded_qr_codes
from tests.test_pages import browser, heading, new_page, page, screenshot  # noqa: F401 (fixtures)

CALLBACK = "/api/payhero/callback?token=sandbox"
NO_CALLBACK_PHONE = "0708000004"  # the sandbox never answers this phone: the test does
SMS_LIMIT = 160
# The SMS of API.md, with everything but the event name at its longest.
SMS = "{event}: 10 ticket(s) paid, receipt SAE3XYZ12Q. Show them at the gate: {url}"


def place_order(client, quantity=2):
    response = client.post("/api/orders", json={**DEMO, "quantity": quantity, "phone": NO_CALLBACK_PHONE})
    assert response.status_code == 201
    return response.get_json()


def pay(client, order, result_code=0):
    assert client.post(CALLBACK, json=callback_body(order, result_code=result_code)).status_code == 200
    return client.get(f"/api/orders/{order['id']}").get_json()


def path_of(url):
    return re.sub(r"^https?://[^/]+", "", url)


def unknown_order_page(client):
    response = client.get("/orders/" + new_order_id())
    assert response.status_code == 404
    return response.get_data(as_text=True)


@pytest.fixture
def paid(client, wire):
    return pay(client, place_order(client))


def test_a_token_round_trips_is_short_enough_for_an_sms_and_names_no_other_order(app):
    with app.test_request_context():
        order_id = new_order_id()
        token = ticket_links.ticket_token(order_id)
        assert ticket_links.order_id_from_token(token) == order_id
        assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token) and len(token) <= 45
        assert ticket_links.ticket_url(order_id) == f"{app.config['PUBLIC_BASE_URL']}/t/{token}"
        assert ticket_links.ticket_token(new_order_id()) != token
        sms = SMS.format(event="Sauti Live", url="https://eventi-tickets.herokuapp.com/t/" + token)
        assert len(sms) <= SMS_LIMIT, sms


def test_a_completed_orders_json_has_its_tickets_url_and_a_pending_one_has_none(app, client, wire, redis_client,
                                                                                settings):
    order = place_order(client)
    assert "tickets_url" not in order and "tickets_url" not in client.get(f"/api/orders/{order['id']}").get_json()
    paid = pay(client, order)
    assert paid["tickets_url"].startswith(settings["PUBLIC_BASE_URL"] + "/t/")
    with app.test_request_context():
        assert ticket_links.order_id_from_token(paid["tickets_url"].rsplit("/", 1)[1]) == order["id"]
    if "REDIS_URL" in settings:  # the published message carries the whole order, as the API shows it
        latest = json.loads(redis_client.get(f"{settings['REDIS_PREFIX']}order:latest:{order['id']}"))
        assert latest["order"] == paid


def test_the_link_shows_the_event_and_every_ticket_and_is_never_cached(client, paid):
    response = client.get(path_of(paid["tickets_url"]))
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "private, no-store"
    assert response.headers["X-Robots-Tag"] == "noindex"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    page = response.get_data(as_text=True)
    assert "<h1>Test This End to End</h1>" in page and "KICC, Nairobi" in page
    assert re.search(r"<time datetime=[^>]+>\w{3} \d\d \w+ \d{4}, \d+:\d\d [ap]m EAT</time>", page)
    assert paid["payment"]["receipt"] in page
    for ticket in paid["tickets"]:
        assert f'<span class="code">{ticket["code"]}</span>' in page
    assert page.count("<svg") == len(paid["tickets"]) == 2


def altered(token, at):
    """`token` with the character at `at` changed to another that keeps it URL-safe."""
    return token[:at] + ("A" if token[at] != "A" else "B") + token[at + 1:]


def signed_under(app, secret, order_id):
    """The token another deployment, one whose secret is `secret`, would give `order_id`."""
    with app.test_request_context():
        kept = app.config["TICKET_LINK_SECRET"]
        app.config["TICKET_LINK_SECRET"] = secret
        try:
            return ticket_links.ticket_token(order_id)
        finally:
            app.config["TICKET_LINK_SECRET"] = kept


def test_a_forged_altered_or_foreign_token_is_the_unknown_order_page_revealing_nothing(app, client, paid):
    token = paid["tickets_url"].rsplit("/", 1)[1]
    assert client.get(f"/t/{token}").status_code == 200
    never_issued = signed_under(app, app.config["TICKET_LINK_SECRET"], new_order_id())  # ours, for no order
    foreign = signed_under(app, "another deployment's secret", paid["id"])
    order_id, signature = token.split(".")
    forged = f"{order_id}.{'A' * len(signature)}"
    not_found = unknown_order_page(client)
    for wrong in (altered(token, 0), altered(token, -1), order_id, forged, never_issued, foreign,
                  "x", f"{token}/x", f"{token}.{signature}"):
        response = client.get(f"/t/{wrong}")
        assert response.status_code == 404, wrong
        assert response.get_data(as_text=True) == not_found
        assert response.headers["Cache-Control"] == "private, no-store"
        assert order_id not in response.get_data(as_text=True)


def test_the_previous_secret_still_opens_the_links_it_signed_until_it_is_dropped(app, client, wire):
    app.config.update(TICKET_LINK_SECRET="old", TICKET_LINK_SECRET_PREVIOUS=None)
    old_link = path_of(pay(client, place_order(client))["tickets_url"])
    app.config.update(TICKET_LINK_SECRET="new", TICKET_LINK_SECRET_PREVIOUS="old")  # rotating
    new_link = path_of(client.get(f"/api/orders/{path_of(old_link)[3:].split('.')[0]}").get_json()["tickets_url"])
    assert new_link != old_link  # the new secret signs
    assert client.get(old_link).status_code == 200 and client.get(new_link).status_code == 200
    app.config.update(TICKET_LINK_SECRET_PREVIOUS=None)  # the rotation is over
    assert client.get(old_link).status_code == 404 and client.get(new_link).status_code == 200


@pytest.mark.parametrize("result_code, heading_text", [
    (None, "M-Pesa hasn't confirmed this payment yet"),
    (1032, "This order was not paid, so it has no tickets"),
])
def test_a_link_to_an_unpaid_order_says_so_and_leads_to_its_payment(app, client, wire, result_code, heading_text):
    order = place_order(client)
    if result_code is not None:
        pay(client, order, result_code)
    with app.test_request_context():
        link = "/t/" + ticket_links.ticket_token(order["id"])
    response = client.get(link)
    page = response.get_data(as_text=True)
    assert response.status_code == 200 and heading_text in page
    assert f'href="/orders/{order["id"]}"' in page and "<svg" not in page


def test_the_success_page_gives_the_link_and_says_where_it_was_sent(app, client, paid):
    page = client.get(f"/orders/{paid['id']}").get_data(as_text=True)
    assert f'Your tickets are also at\n        <a href="{paid["tickets_url"]}"' in page
    # SMS_MODE's default, sandbox, only logs the SMS: nothing reaches the buyer but this page.
    assert "Keep this link: bookmark it" in page and "sending this link" not in page
    app.config.update(SMS_MODE="africastalking", SMTP_URL=None)
    page = client.get(f"/orders/{paid['id']}").get_data(as_text=True)
    assert f"sending this link by SMS to {paid['phone']}," in page
    app.config.update(SMS_MODE="africastalking", SMTP_URL="smtp://mail.example.com:587")
    page = client.get(f"/orders/{paid['id']}").get_data(as_text=True)
    assert f"sending this link by SMS to {paid['phone']} and by email," in page


@pytest.fixture(scope="module")
def shop(live_server_factory):
    return live_server_factory(SANDBOX_CALLBACK_DELAY=1)


@pytest.mark.browser
def test_on_a_phone_the_link_shows_qr_codes_that_scan_to_the_tickets_and_is_accessible(shop, page):
    order = shop.create_order(quantity=3)
    paid = wait_until(lambda: (body := requests.get(f"{shop.url}/api/orders/{order['id']}", timeout=5).json())
                      ["status"] == "completed" and body, message="the sandbox's success")
    codes = [ticket["code"] for ticket in paid["tickets"]]
    page.set_viewport_size({"width": 360, "height": 740})
    response = page.goto(paid["tickets_url"])
    assert response.status == 200 and response.headers["cache-control"] == "private, no-store"
    expect(heading(page, "Test This End to End")).to_be_visible()
    tickets = page.locator("[data-slot=tickets] li")
    expect(tickets).to_have_text(codes)
    assert decoded_qr_codes(tickets) == [[code] for code in codes]
    assert page.evaluate("document.documentElement.scrollWidth") <= 360, "the tickets scroll sideways"
    accessibility = Axe().run(page)  # axe-core, as the package bundles it
    assert accessibility.violations_count == 0, accessibility.generate_report()
    screenshot(page, "tickets", 360)
    assert page.recorder.errors == []


@pytest.mark.browser
def test_the_status_page_gives_the_link_when_the_payment_lands_under_it(shop, page):
    order = shop.create_order(phone=NO_CALLBACK_PHONE)
    with page.expect_request(lambda request: request.url.endswith(f"since={order['version']}")):
        page.goto(f"{shop.url}/orders/{order['id']}")  # holding its wait
    post_callback(shop, order)
    expect(heading(page, "Payment successful")).to_be_visible(timeout=5000)
    tickets_url = requests.get(f"{shop.url}/api/orders/{order['id']}", timeout=5).json()["tickets_url"]
    link = page.get_by_role("link", name=tickets_url)
    expect(link).to_have_attribute("href", tickets_url)
    # The SMS sandbox delivers nothing: the page says to keep the link (test_the_success_page_gives_the_link_...)
    expect(page.get_by_text("Keep this link: bookmark it")).to_be_visible()
    link.click()
    expect(page.locator("[data-slot=tickets] li")).to_have_count(1)
    assert page.recorder.errors == []
