"""An organizer's event in real Chromium, against gunicorn: the sales window's countdown, sold-out
types, max_per_order in the picker, and tickets with QR codes a gate can scan (and print)."""
import io
import re
import subprocess
from datetime import datetime, timedelta, timezone
from urllib.parse import urlparse

import psycopg
import pytest
import requests
from PIL import Image
from playwright.sync_api import expect
from pyzbar.pyzbar import decode

from tests.support import DEMO, EAT, ROOT, event_file, toml, wait_until
from tests.test_pages import ARTIFACTS, browser, heading, new_page, page  # noqa: F401 (fixtures)

pytestmark = pytest.mark.browser

CALLBACK_DELAY = 1
# The phone's clock, an hour behind the server's: a page that trusted it would count an hour too long.
PHONE_CLOCK_AN_HOUR_SLOW = "{ const real = Date.now; Date.now = () => real() - 3600 * 1000; }"


@pytest.fixture(scope="module")
def venue(live_server_factory):
    return live_server_factory(SANDBOX_CALLBACK_DELAY=CALLBACK_DELAY)


def put_on_sale(server, tmp_path, data):
    """`flask events import FILE` against the server's database, as an organizer runs it."""
    path = tmp_path / f"{data['event']['slug']}.toml"
    path.write_text(toml(data))
    result = subprocess.run(["flask", "--app", "wsgi", "events", "import", str(path)], cwd=ROOT, env=server.env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return f"{server.url}/events/{data['event']['slug']}/checkout"


def open_sales_in(server, slug, seconds):
    """Move the event's opening to `seconds` from now, on the database's clock; the new opening."""
    with psycopg.connect(server.env["DATABASE_URL"], autocommit=True) as connection:
        return connection.execute("UPDATE events SET sales_start = now() + make_interval(secs => %s) WHERE slug = %s "
                                  "RETURNING sales_start", (seconds, slug)).fetchone()[0]


def in_eat(moment):
    return moment.astimezone(EAT).isoformat(timespec="milliseconds")


def buy(server, slug, ticket_type, quantity=1, phone="0712345678"):
    return server.create_order(event=slug, ticket_type=ticket_type, quantity=quantity, phone=phone)


def completed(server, order):
    return wait_until(lambda: (body := requests.get(f"{server.url}/api/orders/{order['id']}", timeout=5).json())
                      ["status"] == "completed" and body, timeout=CALLBACK_DELAY + 10, message="the sandbox's success")


def fill_details(page):
    page.get_by_label("Full name").fill(DEMO["name"])
    page.get_by_label("Email").fill(DEMO["email"])
    page.get_by_label("M-Pesa phone number").fill(DEMO["phone"])


def test_checkout_counts_down_on_the_servers_clock_and_opens_without_a_reload(venue, new_page, tmp_path):
    # No line: Pay waits for the opening (with the line on, it joins the line before: test_line_pages.py).
    put_on_sale(venue, tmp_path, event_file(slug="opens-soon", sales_start=in_eat(datetime.now(timezone.utc) + timedelta(hours=1)),
                                            line={"enabled": False}))
    opens = open_sales_in(venue, "opens-soon", seconds=5)  # from now: the import itself takes seconds
    page = new_page()
    page.context.add_init_script(PHONE_CLOCK_AN_HOUR_SLOW)
    page.goto(f"{venue.url}/events/opens-soon/checkout")
    page.evaluate("window.sameDocument = true")

    pay = page.get_by_role("button", name="Pay KES 1,500 with M-Pesa")
    expect(heading(page, re.compile(r"^Sales open in 00:00:0[1-5]$"))).to_be_visible()
    expect(page.get_by_text("This form opens by itself")).to_contain_text(" EAT.")
    expect(pay).to_be_disabled()
    fill_details(page)  # while waiting
    expect(pay).to_be_enabled(timeout=10_000)
    opened_late = datetime.now(timezone.utc) - opens
    print(f"the form opened {opened_late.total_seconds() * 1000:.0f} ms after sales opened")
    assert opened_late < timedelta(seconds=2)
    assert page.evaluate("window.sameDocument") is True, "the page was reloaded"
    expect(page.get_by_text("Sales open in")).to_be_hidden()

    pay.click()
    page.wait_for_url("**/orders/*")
    expect(heading(page, "Payment successful")).to_be_visible(timeout=CALLBACK_DELAY * 1000 + 10_000)
    # The tickets came with the long poll; their QR codes follow without a reload.
    expect(page.locator("[data-slot=tickets] li svg")).to_have_count(1)
    assert page.recorder.errors == []


def test_after_sales_close_the_checkout_says_so(venue, page, tmp_path):
    now = datetime.now(timezone.utc)
    url = put_on_sale(venue, tmp_path, event_file(slug="closed", sales_start=in_eat(now - timedelta(days=2)),
                                                  sales_end=in_eat(now - timedelta(days=1))))
    page.goto(url)
    expect(heading(page, "Sales have closed")).to_be_visible()
    expect(page.get_by_role("button", name=re.compile("^Pay "))).to_be_hidden()


def test_sold_out_types_cannot_be_picked_and_a_sold_out_event_says_so(venue, page, tmp_path):
    url = put_on_sale(venue, tmp_path, event_file(slug="selling-out", ticket_types=[
        {"id": "vip", "name": "VIP", "price": 5000, "quantity": 1},
        {"id": "regular", "name": "Regular", "price": 1500, "quantity": 3, "max_per_order": 3},
        {"id": "group", "name": "Group", "price": 6000, "quantity": 10}]))
    buy(venue, "selling-out", "vip")

    page.goto(url)
    vip = page.get_by_label("VIP")
    expect(vip).to_be_disabled()
    expect(page.locator("label.ticket-option", has=vip)).to_contain_text("Sold out")
    page.locator("label.ticket-option", has=vip).click(force=True)
    expect(vip).not_to_be_checked()
    expect(page.get_by_label("Regular")).to_be_checked()
    # max_per_order: Regular offers 1 to 3; Group all ten.
    quantity = page.get_by_label("Number of tickets")
    expect(quantity.locator("option:not([disabled])")).to_have_text(["1", "2", "3"])
    page.get_by_label("Group").check()
    quantity.select_option("10")
    page.get_by_label("Regular").check()
    expect(quantity).to_have_value("3")
    expect(page.get_by_role("button", name="Pay KES 4,500 with M-Pesa")).to_be_enabled()

    buy(venue, "selling-out", "regular", quantity=3)
    buy(venue, "selling-out", "group", quantity=10)
    page.reload()
    expect(heading(page, "This event is sold out")).to_be_visible()
    expect(page.get_by_role("button", name=re.compile("^Pay "))).to_be_hidden()
    assert page.recorder.errors == []


def decoded_qr_codes(tickets):
    """What a scanner reads off each ticket's QR code, as Chromium draws it: one list per ticket of `tickets` (a locator)."""
    return [[symbol.data.decode() for symbol in decode(Image.open(io.BytesIO(tickets.nth(index).locator("svg").screenshot())))]
            for index in range(tickets.count())]


def test_success_page_qr_codes_decode_to_the_tickets_and_print_on_one_page(venue, page):
    order = completed(venue, buy(venue, DEMO["event"], "early-bird", quantity=10))
    codes = [ticket["code"] for ticket in order["tickets"]]
    page.goto(f"{venue.url}/orders/{order['id']}")
    expect(heading(page, "Payment successful")).to_be_visible()

    tickets = page.locator("[data-slot=tickets] li")
    expect(tickets).to_have_text(codes)
    assert decoded_qr_codes(tickets) == [[code] for code in codes]

    page.emulate_media(media="print")
    ARTIFACTS.mkdir(exist_ok=True)
    pdf = page.pdf(format="A4", path=str(ARTIFACTS / "tickets-print.pdf"))
    pages = len(re.findall(rb"/Type\s*/Page(?!s)", pdf))
    assert pages == 1, f"ten tickets print on {pages} pages"
    expect(page.locator("header.site-header")).to_be_hidden()
    assert {urlparse(r.url).netloc for r in page.recorder.requests} == {urlparse(venue.url).netloc}
    assert page.recorder.errors == []
