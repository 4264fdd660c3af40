"""The checkout's place in the event's line (API.md, "The line") in real Chromium, against gunicorn.

POST /api/orders answers 202 with a place; the page shows it and holds GET /api/queue/<id>/wait until
the place's turn, then shows "check your phone" and the order's status page.  The page's behaviour is
tested against a scripted line (`ScriptedLine`: the page's own requests to /api/queue answered by the
test), so that each state is reached on demand; the order the line "makes" is a real one, paid by the
sandbox.  The line formed by the real server under load is tested end to end in
test_a_real_line_formed_by_the_server_admits_the_page_and_it_pays.
"""
import json
import re
import time
from urllib.parse import parse_qs, urlparse

import psycopg
import pytest
import requests
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import expect

from eventi_flask.web.presenters import PRE_QUEUE_SENTENCE
from tests.support import DEMO, event_file, when
from tests.test_event_pages import fill_details, open_sales_in, put_on_sale
from tests.test_pages import (CALLBACK_DELAY, CHECKOUT_PATH, RESOLVED, browser, fill_checkout, heading,  # noqa: F401
                              new_page, page, screenshot, shop)

pytestmark = pytest.mark.browser

IN_LINE = "You are in line"
YOUR_TURN = "Your turn: check your phone for the M-Pesa prompt"
PAY = "Pay KES 300 with M-Pesa"


class ScriptedLine:
    """Stands in for the server's line: the page's POST is answered 202 with a place, and each wait on
    the place is answered as the API does (at once without `since` or with a version above it, else held until
    the test moves the place with `move`).  Other POSTs go to the real server."""

    def __init__(self, page, place_id="q-scripted-place", **place):
        self.place = {"id": place_id, "status": "queued", "position": 3, "ahead": 2, "estimated_wait_s": 95,
                      "version": 1, "order": None, "error": None, **place}
        self.held, self.waits, self.posts = [], [], []
        self.joined = False
        page.route("**/api/orders", self._post)
        page.route("**/api/queue/**", self._wait)

    def _post(self, route):
        self.posts.append(route.request)
        if self.joined:
            route.continue_()
            return
        self.joined = True
        queue = {key: self.place[key] for key in ("id", "position", "ahead", "estimated_wait_s", "version")}
        route.fulfill(status=202, headers={"Location": f"/api/queue/{self.place['id']}"},
                      json={"status": "queued", "queue": queue})

    def _wait(self, route):
        url = urlparse(route.request.url)
        assert url.path == f"/api/queue/{self.place['id']}/wait", url.path
        self.waits.append(route.request)
        since = parse_qs(url.query).get("since")
        if since is None or self.place["version"] > int(since[0]):
            route.fulfill(json=self.place, headers={"Cache-Control": "no-store"})
        else:
            self.held.append(route)

    def move(self, **changes):
        """The place changes (a new version), and every held wait is answered with it."""
        self.place = {**self.place, **changes, "version": self.place["version"] + 1}
        held, self.held = self.held, []
        for route in held:
            route.fulfill(json=self.place, headers={"Cache-Control": "no-store"})

    def sinces(self):
        return [parse_qs(urlparse(request.url).query).get("since", [None])[0] for request in self.waits]


def join(page, server, phone="0712345678"):
    fill_checkout(page, server, phone)
    page.get_by_role("button", name=PAY).click()
    expect(heading(page, IN_LINE)).to_be_visible()


def place_text(page):
    return page.locator("[data-line-place]")


def assert_accessible(page):
    accessibility = Axe().run(page)  # axe-core, as the package bundles it
    assert accessibility.violations_count == 0, accessibility.generate_report()


def test_a_place_in_line_moves_up_survives_a_reload_then_its_turn_shows_the_payment(shop, page):
    line = ScriptedLine(page)
    join(page, shop)
    expect(place_text(page)).to_have_text("2 ahead of you, about 2 minutes to wait.")
    expect(page.get_by_role("button", name=PAY)).to_be_hidden()  # the form gives way to the place
    assert_accessible(page)

    line.move(position=2, ahead=1, estimated_wait_s=44)
    expect(place_text(page)).to_have_text("1 ahead of you, about 40 seconds to wait.")
    screenshot(page, "line", 1280)
    screenshot(page, "line", 360)  # docs/screenshots/line-360.png is a copy
    assert page.evaluate("document.documentElement.scrollWidth") <= 360, "the line scrolls sideways"

    # A reload asks for the same place (without `since`: at once): no second POST, the place as it is now.
    with page.expect_request(lambda request: "/api/queue/" in request.url):
        page.reload()
    expect(heading(page, IN_LINE)).to_be_visible()
    expect(place_text(page)).to_have_text("1 ahead of you, about 40 seconds to wait.")
    assert len(line.posts) == 1
    assert None in line.sinces()

    line.move(position=1, ahead=0, estimated_wait_s=3)
    expect(place_text(page)).to_have_text("You're next, less than 10 seconds to wait.")

    order = shop.create_order(phone="0712345678")  # the order the line makes at the place's turn (STK push sent)
    line.move(status="admitted", position=0, ahead=0, estimated_wait_s=0, order=order)
    expect(heading(page, YOUR_TURN)).to_be_visible()
    page.wait_for_url(f"**/orders/{order['id']}")
    expect(heading(page, "Payment successful")).to_be_visible(timeout=CALLBACK_DELAY * 1000 + 5000)
    assert page.recorder.console[-1] == RESOLVED.format("completed")
    assert page.recorder.errors == []

    # The place is over: the checkout is the form again.
    page.goto(shop.url + CHECKOUT_PATH)
    expect(page.get_by_role("button", name=PAY)).to_be_visible()


@pytest.mark.parametrize("status, error, title, action", [
    ("sold_out", {"code": "sold_out", "message": "Only 0 Early bird tickets are left.", "fields": {}},
     "Sold out before your turn", "Choose other tickets"),
    ("refused", {"code": "sales_closed", "message": "Sales for this event have closed.", "fields": {}},
     "We couldn't start your payment", "Back to the form"),
])
def test_a_place_that_cannot_be_served_says_so_and_goes_back_to_the_form(shop, page, status, error, title, action):
    line = ScriptedLine(page)
    join(page, shop)
    line.move(status=status, error=error)
    expect(heading(page, title)).to_be_visible()
    if status == "refused":
        expect(page.locator("[data-line-reason]")).to_have_text(error["message"])
    expect(page.locator("[data-line-state]:not([hidden])").get_by_text("Nothing was charged.")).to_be_visible()
    assert_accessible(page)
    screenshot(page, f"line-{status}", 360)

    page.get_by_role("button", name=action).click()
    page.wait_for_url(f"**{CHECKOUT_PATH}?*")
    expect(page.get_by_label("Early bird")).to_be_checked()
    expect(page.get_by_label("M-Pesa phone number")).to_have_value("0712345678")  # the details are kept
    expect(page.get_by_role("button", name=PAY)).to_be_visible()


def test_a_place_given_up_can_join_again_with_a_new_key(shop, page):
    line = ScriptedLine(page)
    join(page, shop, phone="0712345675")
    line.move(status="left")
    expect(heading(page, "Your place in line was given up")).to_be_visible()
    page.get_by_role("button", name="Join the line again").click()  # the real server answers this one: 201
    page.wait_for_url("**/orders/*")
    expect(heading(page, "Payment successful")).to_be_visible(timeout=CALLBACK_DELAY * 1000 + 5000)
    keys = [post.header_value("Idempotency-Key") for post in line.posts]
    assert len(keys) == 2 and keys[0] != keys[1]
    assert json.loads(line.posts[0].post_data) == json.loads(line.posts[1].post_data)


def test_a_place_the_server_forgot_is_asked_for_again_with_the_same_key(shop, page):
    forgotten = []
    line = ScriptedLine(page)
    join(page, shop, phone="0712345676")
    page.unroute("**/api/queue/**")
    page.route("**/api/queue/**", lambda route: forgotten.append(route) or route.fulfill(
        status=404, json={"error": {"code": "not_found", "message": "No such place.", "fields": {}}}))
    line.move(ahead=1)  # the held wait is answered; the next one is a 404
    page.wait_for_url("**/orders/*")  # the same key, sent again, reached the real server: 201
    keys = [post.header_value("Idempotency-Key") for post in line.posts]
    assert forgotten and len(keys) == 2 and keys[0] == keys[1]


def slow_line(server):
    """`server`, whose demo event's line admits one order a second ([event.line] max_rate = 1)."""
    with psycopg.connect(server.env["DATABASE_URL"], autocommit=True) as connection:
        connection.execute("UPDATE events SET line_max_rate = 1 WHERE slug = %s", (DEMO["event"],))
    return server


@pytest.fixture(scope="module")
def busy_shop(live_server_factory):
    """A server whose every order joins its event's line (LINE_FORCE), one admitted a second: a line that forms
    on demand and moves slowly enough to be watched."""
    return slow_line(live_server_factory(SANDBOX_CALLBACK_DELAY=CALLBACK_DELAY, LINE_FORCE="1"))


def take_places(server, how_many):
    """Other buyers' places in the line, taken through the API: the ids."""
    places = []
    for i in range(how_many):
        answer = requests.post(f"{server.url}/api/orders", json={**DEMO, "phone": f"07123400{i:02d}"},
                               headers={"Idempotency-Key": f"ahead-{i}-{time.time()}"}, timeout=10)
        assert answer.status_code == 202, answer.text
        places.append(answer.json()["queue"]["id"])
    return places


def test_a_real_line_formed_by_the_server_admits_the_page_and_it_pays(busy_shop, page):
    take_places(busy_shop, 6)
    join(page, busy_shop, phone="0712345679")
    expect(place_text(page)).to_have_text(re.compile(r"^\d+ ahead of you, (about \d+ seconds|less than 10 seconds) to wait\.$"))
    assert_accessible(page)

    with page.expect_request(lambda request: "/api/queue/" in request.url):
        page.reload()  # still in line: the same place, asked for again
    expect(heading(page, IN_LINE)).to_be_visible()
    expect(place_text(page)).to_have_text(re.compile(r"ahead of you|You're next"))
    assert len(page.recorder.order_posts()) == 1

    expect(heading(page, YOUR_TURN)).to_be_visible(timeout=20_000)
    page.wait_for_url("**/orders/*")
    expect(heading(page, "Payment successful")).to_be_visible(timeout=CALLBACK_DELAY * 1000 + 5000)
    assert page.recorder.console[-1] == RESOLVED.format("completed")
    assert page.recorder.errors == []


def test_a_place_held_through_a_restart_keeps_its_turn(live_server_factory, page):
    server = slow_line(live_server_factory(SANDBOX_CALLBACK_DELAY=CALLBACK_DELAY, LINE_FORCE="1"))  # its own: restarted
    take_places(server, 8)
    join(page, server, phone="0712345678")
    with page.expect_event("requestfailed", lambda request: "/api/queue/" in request.url, timeout=20_000):
        server.stop_web()  # SIGTERM, as a deploy: the held wait is answered 503, then the server is gone
    expect(page.locator("[data-line-connection]")).to_contain_text("Connection problem")
    server.start_web()  # the line is in Redis: the place is still there
    expect(heading(page, YOUR_TURN)).to_be_visible(timeout=30_000)
    page.wait_for_url("**/orders/*")
    expect(heading(page, "Payment successful")).to_be_visible(timeout=CALLBACK_DELAY * 1000 + 5000)
    assert len(page.recorder.order_posts()) == 1


def test_before_sales_open_the_page_waits_for_the_draw_then_pays(busy_shop, page, tmp_path):
    put_on_sale(busy_shop, tmp_path, event_file(slug="opens-with-a-line", sales_start=when(hours=1),
                                                line={"pre_queue_minutes": 120}))
    open_sales_in(busy_shop, "opens-with-a-line", seconds=8)

    page.goto(f"{busy_shop.url}/events/opens-with-a-line/checkout")
    expect(page.locator("[data-sales-notice=not_open]")).to_contain_text(PRE_QUEUE_SENTENCE)
    fill_details(page)
    page.get_by_label("Regular").check()
    page.get_by_role("button", name="Pay KES 1,500 with M-Pesa").click()
    expect(heading(page, IN_LINE)).to_be_visible()
    expect(place_text(page)).to_have_text("You have a place for the opening.")
    expect(page.locator("[data-line-pre-queue]")).to_contain_text("Sales have not opened yet")
    assert_accessible(page)

    expect(heading(page, YOUR_TURN)).to_be_visible(timeout=20_000)  # drawn at the opening, and first
    page.wait_for_url("**/orders/*")
    expect(heading(page, "Payment successful")).to_be_visible(timeout=CALLBACK_DELAY * 1000 + 5000)
