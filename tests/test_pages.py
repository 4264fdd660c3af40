"""The checkout and payment-status pages in real Chromium, against gunicorn with the gevent worker.

Playwright's sync API runs an asyncio loop inside a greenlet of its own.  Under
the suite's gevent monkey-patching that loop gets gevent's selector
(gevent.selectors.GeventSelector), so its waits on the driver's pipe go through
the gevent hub and switch back: the sync API works unchanged, no subprocess
needed.  The servers under test are separate gunicorn processes.
"""
import json
import time
from datetime import datetime
from urllib.parse import urlparse

import pytest
import requests
from playwright.sync_api import expect, sync_playwright

from eventi_flask.orders.state import PLAIN_REASONS
from tests.support import DEMO, ROOT, callback_body, held_waits, post_callback, wait_until

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"
CHECKOUT_PATH = f"/events/{DEMO['event']}/checkout"
CALLBACK_DELAY = 3
FORM_SENTENCES_NETWORK = "We couldn't reach Eventi. Check your internet connection and try again."
PAGE_BUDGET_BYTES = 100 * 1024
# Ends a page's initial state, one per status; CSP violations and failed loads show up as errors.
RESOLVED = "✅ Payment status resolved! Final status: {}"


@pytest.fixture(scope="module")
def shop(live_server_factory):
    """The realistic server: the sandbox answers after 3 s, a wait holds for the default 55 s."""
    return live_server_factory(SANDBOX_CALLBACK_DELAY=CALLBACK_DELAY)


@pytest.fixture(scope="module")
def impatient_shop(live_server_factory):
    """Holds of one second, so four unanswered waits take seconds, not minutes."""
    return live_server_factory(SANDBOX_CALLBACK_DELAY=CALLBACK_DELAY, WAIT_TIMEOUT_DEFAULT=1)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Recorder:
    """Everything a page did that a test asserts on: requests, console lines, errors."""

    def __init__(self, page):
        self.requests, self.console, self.errors = [], [], []
        page.on("request", lambda request: self.requests.append(request))
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _console(self, message):
        self.console.append(message.text)
        if message.type == "error":
            self.errors.append(message.text)

    def waits(self):
        return [r for r in self.requests if is_wait(r)]

    def order_posts(self):
        return [r for r in self.requests if r.method == "POST" and urlparse(r.url).path == "/api/orders"]


# Records, in the page's own clock, when the success state became visible:
# Playwright's own polling is too coarse to time a 1 s budget.
RECORD_SUCCESS_SHOWN = """
new MutationObserver(() => {
  const success = document.querySelector('[data-state=completed]');
  if (success && !success.hidden && !window.successShownAt) window.successShownAt = Date.now();
}).observe(document, {subtree: true, childList: true, attributes: true, attributeFilter: ['hidden']});
"""


@pytest.fixture
def new_page(browser):
    """new_page() -> a page in a fresh browser context (empty cache and storage), with a Recorder."""
    contexts = []

    def open_page():
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        context.add_init_script(RECORD_SUCCESS_SHOWN)
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.recorder = Recorder(page)
        return page

    yield open_page
    for context in contexts:
        context.close()


@pytest.fixture
def page(new_page):
    return new_page()


def fill_checkout(page, server, phone, **details):
    details = {**DEMO, "phone": phone, **details}
    page.goto(server.url + CHECKOUT_PATH)
    page.get_by_label("Full name").fill(details["name"])
    page.get_by_label("Email").fill(details["email"])
    page.get_by_label("M-Pesa phone number").fill(details["phone"])
    return details


def pay(page, server, phone):
    """Fill the checkout as a customer would, press Pay, and land on the order's status page."""
    fill_checkout(page, server, phone)
    page.get_by_role("button", name="Pay KES 300 with M-Pesa").click()
    page.wait_for_url("**/orders/*")
    return urlparse(page.url).path.rsplit("/", 1)[1]


def is_wait_url(url):
    return urlparse(url).path.endswith("/wait")


def is_wait(request):
    return is_wait_url(request.url)


def spoil_the_first(spoil, spoilt):
    """A route handler: the first request is put in `spoilt` and answered by spoil(route); the others go through."""
    def handle(route):
        if spoilt:
            route.continue_()
        else:
            spoilt.append(route.request)
            spoil(route)
    return handle


def fetch_order(server, order_id):
    return requests.get(f"{server.url}/api/orders/{order_id}", timeout=5).json()


def timestamp(iso):
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def heading(page, name):
    return page.get_by_role("heading", name=name, exact=True)


def screenshot(page, name, width):
    page.set_viewport_size({"width": width, "height": 900})
    path = ARTIFACTS / f"{name}-{width}.png"
    path.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


def test_sandbox_payment_shows_success_within_a_second_of_the_callback_after_one_wait(shop, page):
    order_id = pay(page, shop, "0712345678")
    expect(heading(page, "Payment successful")).to_be_visible(timeout=CALLBACK_DELAY * 1000 + 5000)

    order = fetch_order(shop, order_id)
    assert order["status"] == "completed"
    callback_applied = timestamp(order["updated_at"])
    assert callback_applied - timestamp(order["created_at"]) >= CALLBACK_DELAY - 0.1
    shown_after = page.evaluate("window.successShownAt") / 1000 - callback_applied
    print(f"success shown {shown_after * 1000:.0f} ms after the callback was applied")
    assert 0 <= shown_after < 1.0, f"success shown {shown_after:.3f}s after the callback"
    assert len(page.recorder.waits()) == 1

    expect(page.locator("[data-slot=receipt]")).to_have_text(order["payment"]["receipt"])
    expect(page.locator("[data-slot=amount]")).to_have_text("KES 300")
    expect(page.locator("[data-slot=tickets] li")).to_have_text([t["code"] for t in order["tickets"]])
    expect(heading(page, "Waiting for payment")).to_be_hidden()
    console = page.recorder.console
    assert "⏳ Long polling attempt 1/4 - Waiting for payment..." in console
    assert any(line.startswith("📊 Order status received: {") and '"status":"completed"' in line for line in console)
    assert console[-1] == RESOLVED.format("completed")
    assert page.recorder.errors == []


@pytest.mark.parametrize("phone, title, result_code", [
    ("0708000001", "Payment cancelled", 1032),
    ("0708000002", "Payment failed", 1),
])
def test_unsuccessful_payment_gives_the_reason_and_try_again_refills_the_form(shop, page, phone, title, result_code):
    pay(page, shop, phone)
    expect(heading(page, title)).to_be_visible(timeout=CALLBACK_DELAY * 1000 + 5000)
    expect(page.locator("[data-state]:not([hidden]) [data-slot=reason]")).to_have_text(PLAIN_REASONS[result_code])
    assert page.recorder.console[-1] == RESOLVED.format("cancelled" if result_code == 1032 else "failed")

    page.get_by_role("link", name="Try again").click()
    page.wait_for_url(f"**{CHECKOUT_PATH}?*")
    expect(page.get_by_label("Full name")).to_have_value(DEMO["name"])
    expect(page.get_by_label("Email")).to_have_value(DEMO["email"])
    expect(page.get_by_label("M-Pesa phone number")).to_have_value(phone)
    expect(page.get_by_label("Early bird")).to_be_checked()
    assert page.recorder.errors == []


def test_four_unanswered_holds_say_still_waiting_and_check_again_finds_a_later_success(impatient_shop, page):
    order_id = pay(page, impatient_shop, "0708000004")  # the sandbox never calls back for this phone
    expect(heading(page, "Still waiting")).to_be_visible(timeout=15_000)
    assert len(page.recorder.waits()) == 4
    for attempt in range(1, 5):
        assert f"⏳ Long polling attempt {attempt}/4 - Waiting for payment..." in page.recorder.console
    assert fetch_order(impatient_shop, order_id)["status"] == "pending"

    with page.expect_request(is_wait):
        page.get_by_role("button", name="Check again").click()
    expect(heading(page, "Waiting for payment")).to_be_visible()
    success = callback_body(fetch_order(impatient_shop, order_id))  # classic shape, ResultCode 0
    answer = requests.post(f"{impatient_shop.url}/api/payhero/callback?token=sandbox", json=success, timeout=5)
    assert answer.status_code == 200, answer.text

    expect(heading(page, "Payment successful")).to_be_visible(timeout=5000)
    assert page.recorder.console[-1] == RESOLVED.format("completed")
    assert page.recorder.errors == []


def test_bad_phone_is_flagged_beside_the_field_and_nothing_is_sent(shop, page):
    fill_checkout(page, shop, "0612 345 678")
    page.get_by_role("button", name="Pay KES 300 with M-Pesa").click()

    phone = page.get_by_label("M-Pesa phone number")
    expect(page.locator("#phone-error")).to_have_text("Enter a Safaricom or Airtel Kenya number, like 0712 345 678.")
    expect(phone).to_have_attribute("aria-invalid", "true")
    expect(phone).to_be_focused()
    expect(phone).to_have_value("0612 345 678")
    assert page.recorder.order_posts() == []
    assert urlparse(page.url).path == CHECKOUT_PATH


def test_server_field_error_is_shown_beside_its_field_and_the_form_keeps_what_was_typed(shop, page):
    # The client's checks pass; the server is made to disagree about the quantity on the way out.
    def send_eleven(route):
        route.continue_(post_data=json.dumps({**json.loads(route.request.post_data), "quantity": 11}))

    page.route("**/api/orders", send_eleven)
    fill_checkout(page, shop, "0712345678")
    with page.expect_response("**/api/orders") as refused:
        page.get_by_role("button", name="Pay KES 300 with M-Pesa").click()
    assert refused.value.status == 400

    expect(page.locator("#quantity-error")).to_have_text("Choose between 1 and 10 tickets.")
    expect(page.get_by_label("Number of tickets")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Full name")).to_have_value(DEMO["name"])
    expect(page.get_by_label("M-Pesa phone number")).to_have_value("0712345678")
    expect(page.get_by_role("button", name="Pay KES 300 with M-Pesa")).to_be_enabled()
    assert urlparse(page.url).path == CHECKOUT_PATH


@pytest.mark.parametrize("status, error, sentence", [
    (409, {"code": "sold_out", "message": "Only 2 Early bird tickets are left.", "fields": {"quantity": "Only 2 left."}},
     "Only 2 Early bird tickets are left. Choose fewer tickets or another ticket type."),
    (429, {"code": "too_many_requests", "message": "Too many payment requests for this phone number. Please wait a few minutes and try again.", "fields": {}},
     "Too many payment requests for this phone number. Please wait a few minutes and try again."),
    (502, {"code": "payhero_unavailable", "message": "upstream said no", "fields": {}},
     "We couldn't reach M-Pesa to start the payment. Nothing was charged; please try again in a moment."),
    # M-Pesa's own rules: the API's sentence says what to do, and nothing is added to it.
    (409, {"code": "payment_in_progress", "message": PLAIN_REASONS[1001], "fields": {}}, PLAIN_REASONS[1001]),
    (502, {"code": "payment_refused", "message": PLAIN_REASONS[17], "fields": {}}, PLAIN_REASONS[17]),
])
def test_refusals_become_sentences_and_the_customer_can_try_again(shop, page, status, error, sentence):
    # Sold out, rate-limited and PayHero-down are hard to provoke on demand; the API's answer is stood in for.
    page.route("**/api/orders", lambda route: route.fulfill(status=status, json={"error": error}))
    fill_checkout(page, shop, "0712345678")
    page.get_by_role("button", name="Pay KES 300 with M-Pesa").click()
    expect(page.get_by_role("alert")).to_have_text(sentence)
    expect(page.get_by_role("button", name="Pay KES 300 with M-Pesa")).to_be_enabled()
    expect(page.get_by_label("M-Pesa phone number")).to_have_value("0712345678")


def test_a_busy_server_is_asked_again_by_the_page_with_the_same_key_until_the_order_is_made(shop, page):
    turned_away = []
    busy = {"code": "busy", "message": "Many people are buying right now; please try again in a few seconds.", "fields": {}}
    page.route("**/api/orders", spoil_the_first(
        lambda route: route.fulfill(status=503, headers={"Retry-After": "1"}, json={"error": busy}), turned_away))
    fill_checkout(page, shop, "0712345673")
    page.get_by_role("button", name="Pay KES 300 with M-Pesa").click()

    expect(page.get_by_role("status").filter(has_text="Busy, still trying")).to_be_visible()
    expect(page.get_by_role("button", name="Busy, still trying…")).to_be_disabled()
    page.wait_for_url("**/orders/*")
    expect(heading(page, "Payment successful")).to_be_visible(timeout=CALLBACK_DELAY * 1000 + 5000)
    keys = [post.header_value("Idempotency-Key") for post in page.recorder.order_posts()]
    assert len(keys) == 2 and keys[0] == keys[1] == turned_away[0].header_value("Idempotency-Key") and len(keys[0]) >= 32
    assert [error for error in page.recorder.errors if "status of 503" not in error] == []  # the browser logs the 503 itself


def test_an_order_sent_again_after_a_lost_answer_keeps_its_key(shop, page):
    lost = []
    page.route("**/api/orders", spoil_the_first(lambda route: route.abort("connectionreset"), lost))
    fill_checkout(page, shop, "0712345674")
    pay_button = page.get_by_role("button", name="Pay KES 300 with M-Pesa")
    pay_button.click()
    expect(page.get_by_role("alert")).to_have_text(FORM_SENTENCES_NETWORK)
    pay_button.click()
    page.wait_for_url("**/orders/*")
    keys = [post.header_value("Idempotency-Key") for post in page.recorder.order_posts()]
    assert keys == [lost[0].header_value("Idempotency-Key")] * 2


def test_reload_in_the_middle_of_a_wait_resumes_it_and_ends_on_success(shop, page):
    with page.expect_request(is_wait):
        order_id = pay(page, shop, "0712345670")
    with page.expect_request(is_wait):
        page.reload()
    reloaded_at = time.time()
    expect(heading(page, "Payment successful")).to_be_visible(timeout=CALLBACK_DELAY * 1000 + 5000)
    assert timestamp(fetch_order(shop, order_id)["updated_at"]) > reloaded_at, "the callback came before the reload"
    assert len(page.recorder.waits()) == 2
    assert page.recorder.console[-1] == RESOLVED.format("completed")


def test_a_network_error_is_retried_without_counting_as_an_attempt(shop, page):
    dropped = []
    page.route(is_wait_url, spoil_the_first(lambda route: route.abort("connectionreset"), dropped))
    pay(page, shop, "0712345672")
    expect(heading(page, "Payment successful")).to_be_visible(timeout=CALLBACK_DELAY * 1000 + 5000)
    console = page.recorder.console
    assert dropped and len(page.recorder.waits()) == 2
    assert any(line.startswith("🔌 Could not reach the server") for line in console)
    assert console.count("⏳ Long polling attempt 1/4 - Waiting for payment...") == 2
    assert not any("attempt 2/4" in line for line in console)
    assert console[-1] == RESOLVED.format("completed")


def test_a_page_waiting_through_a_restart_shows_the_payment_within_5_s_of_the_server_answering_again(
        live_server_factory, page):
    server = live_server_factory()  # its own: this test stops and starts it
    wait_answers = []
    page.on("response", lambda response: is_wait(response.request) and wait_answers.append(
        (response.status, response.headers.get("retry-after"))))
    order_id = pay(page, server, "0708000004")  # the sandbox never calls back: the callback below is the payment
    wait_until(lambda: held_waits(server, 1), message="the page's wait to be held")

    with page.expect_event("requestfailed", lambda request: is_wait(request), timeout=20_000):
        server.stop_web()  # SIGTERM, as a deploy does: the held wait is answered 503 shutting_down
    # ... and the page found the server gone (a refused connection) while it tried again.
    server.start_web()  # on the same port, the same database
    back_at = time.time() * 1000
    success = callback_body(fetch_order(server, order_id))
    assert requests.post(f"{server.url}/api/payhero/callback?token=sandbox", json=success, timeout=5).status_code == 200

    expect(heading(page, "Payment successful")).to_be_visible(timeout=10_000)
    assert page.evaluate("window.successShownAt") - back_at < 5000
    assert wait_answers[0] == (503, "1"), wait_answers  # the held wait, answered when the worker was stopping
    # Reconnects, not attempts: the page never counted toward "still waiting".
    console = page.recorder.console
    assert any(line.startswith("🔌 Could not reach the server (HTTP 503)") for line in console)
    assert not any("attempt 2/4" in line for line in console)
    assert console[-1] == RESOLVED.format("completed")


def page_weight(page):
    """Bytes a first visit downloads: the page and everything it loaded (bodies, before any compression)."""
    return sum(len(request.response().body()) for request in page.recorder.requests)


def test_pages_are_light_self_hosted_and_screenshotted_at_phone_and_desktop_widths(shop, page, new_page):
    order = shop.create_order(phone="0712345671", quantity=2)
    response = page.goto(shop.url + CHECKOUT_PATH)
    assert "default-src 'self'" in response.headers["content-security-policy"]
    expect(page.get_by_role("button", name="Pay KES 300 with M-Pesa")).to_be_enabled()
    page.get_by_label("Number of tickets").select_option("3")
    expect(page.get_by_role("button", name="Pay KES 900 with M-Pesa")).to_be_visible()
    page.get_by_label("Regular").check()
    expect(page.get_by_role("button", name="Pay KES 1,500 with M-Pesa")).to_be_visible()
    page.get_by_label("Number of tickets").select_option("1")
    page.get_by_label("Early bird").check()
    checkout_weight = page_weight(page)
    assert checkout_weight < PAGE_BUDGET_BYTES, f"checkout weighs {checkout_weight} bytes"
    fill_checkout(page, shop, "0712 345 678")
    page.evaluate("document.activeElement.blur()")  # no focus ring in the picture
    for width in (360, 1280):
        screenshot(page, "checkout", width)
        assert page.evaluate("document.documentElement.scrollWidth") <= width, "the checkout scrolls sideways"

    status = new_page()  # a cold cache, as for someone following a link to their order
    status.goto(f"{shop.url}/orders/{order['id']}")
    expect(heading(status, "Payment successful")).to_be_visible(timeout=CALLBACK_DELAY * 1000 + 5000)
    status_weight = page_weight(status)
    assert status_weight < PAGE_BUDGET_BYTES, f"the status page weighs {status_weight} bytes"
    print(f"checkout {checkout_weight} bytes, status page {status_weight} bytes")
    for width in (360, 1280):
        screenshot(status, "success", width)
        assert status.evaluate("document.documentElement.scrollWidth") <= width, "the status page scrolls sideways"
    for visited in (page, status):
        assert {urlparse(r.url).netloc for r in visited.recorder.requests} == {urlparse(shop.url).netloc}
        assert visited.recorder.errors == []


def test_unknown_order_gets_a_not_found_page(shop, page):
    response = page.goto(f"{shop.url}/orders/not-a-real-order")
    assert response.status == 404
    expect(heading(page, "We couldn't find that page")).to_be_visible()


def settled_order(server, phone):
    """An order the sandbox has settled (its callback came), as the API shows it."""
    order = server.create_order(phone=phone)
    return wait_until(lambda: (body := fetch_order(server, order["id"]))["status"] != "pending" and body,
                      timeout=CALLBACK_DELAY + 10, message=f"the sandbox's callback for {phone}")


def set_capacity(server, ticket_type, capacity=None):
    """The ticket type's capacity: `capacity`, or (None) no more than what is held now."""
    import psycopg

    with psycopg.connect(server.env["DATABASE_URL"], autocommit=True) as connection:
        connection.execute("UPDATE ticket_types SET capacity = COALESCE(%s, reserved) WHERE code = %s",
                           (capacity, ticket_type))


def test_a_late_success_shows_the_tickets_or_with_none_left_says_a_refund_is_due(shop, page):
    order_id = pay(page, shop, "0708000005")  # the sandbox: phone unreachable (1037)
    expect(heading(page, "Payment failed")).to_be_visible(timeout=CALLBACK_DELAY * 1000 + 5000)
    expect(page.locator("[data-state]:not([hidden]) [data-slot=reason]")).to_have_text(PLAIN_REASONS[1037])
    post_callback(shop, fetch_order(shop, order_id))  # M-Pesa's success, after all
    page.reload()
    expect(heading(page, "Payment successful")).to_be_visible()
    expect(page.locator("[data-slot=tickets] li")).to_have_count(1)

    owed = settled_order(shop, "0708000005")
    set_capacity(shop, "early-bird")  # sold out meanwhile
    try:
        post_callback(shop, owed)
    finally:
        set_capacity(shop, "early-bird", 1_000_000)
    receipt = fetch_order(shop, owed["id"])["payment"]["receipt"]
    page.goto(f"{shop.url}/orders/{owed['id']}")
    expect(heading(page, "Payment received: refund due")).to_be_visible()
    expect(page.locator("[data-slot=refund-receipt]")).to_have_text(receipt)
    expect(page.get_by_text("Your money will be refunded to your M-Pesa.")).to_be_visible()
    expect(page.get_by_role("link", name="Try again")).to_be_hidden()  # they paid: no second payment
    assert page.recorder.errors == []


def test_m_pesa_s_rule_17_is_said_on_the_status_page_and_again_on_the_checkout(shop, page):
    order = shop.create_order(phone="0708000004")  # the sandbox never calls back: the test does
    with page.expect_request(is_wait):
        page.goto(f"{shop.url}/orders/{order['id']}")
    post_callback(shop, order, result_code=17)
    expect(heading(page, "Payment failed")).to_be_visible(timeout=5000)  # changed under the open page
    expect(page.locator("[data-state]:not([hidden]) [data-slot=reason]")).to_have_text(PLAIN_REASONS[17])
    page.get_by_role("link", name="Try again").click()
    page.wait_for_url(f"**{CHECKOUT_PATH}?*after=17*")
    expect(page.locator("[data-retry-advice]")).to_have_text(f"Your last payment did not go through. {PLAIN_REASONS[17]}")
    assert "wait 2 minutes" in PLAIN_REASONS[17]
    assert page.recorder.errors == []
