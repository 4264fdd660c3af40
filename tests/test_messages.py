"""Issue 25: the tickets reach the buyer when the tab is gone, by SMS and email, through an outbox.

Against a real SMTP server (aiosmtpd, in a process of its own: tests/smtp_server.py) and a stand-in
for Africa's Talking on a spare port that answers in its documented format.  The sandbox PayHero
pays the orders; its callback completes them, and the messages leave after that commit.
"""
import email
import email.policy
import io
import re
import secrets
import subprocess
import sys
import time

import gevent
import psycopg
import pytest
import requests
import requests_mock
from sqlalchemy import insert, select

import config as app_config
from config import Config, ConfigError
from eventi_flask import create_app, metrics
from eventi_flask.clock import as_utc, utcnow
from eventi_flask.extensions import db
from eventi_flask.events.models import TicketType
from eventi_flask.messages import sender as sender_module
from eventi_flask.messages import start_sender, stop_sender
from eventi_flask.messages.models import OutboxMessage
from eventi_flask.messages.sender import Sender
from eventi_flask.messages.service import delivery_channels, outbox_rows, wake_after_commit
from eventi_flask.messages.texts import SMS_LIMIT, gsm_length, sms_text
from eventi_flask.orders.models import Order, Ticket
from eventi_flask.web.ticket_links import order_id_from_token
from bench.sms_standin import AfricasTalkingStandIn
from tests.conftest import PUBLIC, shut_down
from tests.support import DEMO, ROOT, Statements, free_port, procfile_command, wait_until

MAIL_FROM = "Eventi Tickets <tickets@eventi.test>"
REFUSED_PHONE = "0799000403"  # the stand-in answers statusCode 403 InvalidPhoneNumber for it
class SmtpServer:
    """tests/smtp_server.py on a spare port; stopped and started again on the same port."""

    def __init__(self, directory, secured=()):
        self.port = free_port()
        self.url = f"smtp://127.0.0.1:{self.port}"
        self.directory = directory
        directory.mkdir(exist_ok=True)
        self.secured = [str(arg) for arg in secured]  # certificate, key, user, password: STARTTLS and a login
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "smtp_server.py"), str(self.port),
                                      str(self.directory), *self.secured],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout.readline().strip() == b"ready"
        return self

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def messages(self):
        return [email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
                for path in sorted(self.directory.glob("*.eml"))]

    def to(self, address):
        return [message for message in self.messages() if message["To"] == address]


@pytest.fixture
def smtp(tmp_path):
    server = SmtpServer(tmp_path / "mail").start()
    yield server
    server.stop()


@pytest.fixture
def sms_provider():
    stand_in = AfricasTalkingStandIn()
    stand_in.codes["+254" + REFUSED_PHONE[1:]] = 403
    yield stand_in
    stand_in.stop()


def messaging_env(smtp, sms_provider):
    return {"SMS_MODE": "africastalking", "AFRICASTALKING_USERNAME": "eventi", "AFRICASTALKING_API_KEY": "at-key-123",
            "AFRICASTALKING_SENDER_ID": "EVENTI", "AFRICASTALKING_BASE_URL": sms_provider.url,
            "SMTP_URL": smtp.url, "MAIL_FROM": MAIL_FROM, "MESSAGES_RETRY": "0.2,0.5", "MESSAGES_SWEEP_INTERVAL": "0.2"}


@pytest.fixture
def settings(settings, smtp, sms_provider, request):
    env = {**settings, **messaging_env(smtp, sms_provider)}
    for marker in reversed(list(request.node.iter_markers("env"))):  # a test's own still wins
        env.update(marker.kwargs)
    return env


@pytest.fixture
def wire(wire, sms_provider):
    # The stand-in is a real server: its requests go out, not to the in-process wire.
    wire.register_uri(requests_mock.ANY, re.compile("^" + re.escape(sms_provider.url) + "/"), real_http=True)
    return wire


@pytest.fixture
def sender(app):
    yield start_sender(app)
    stop_sender(app)


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()
    return lambda *args: runner.invoke(args=list(args))


def phone(local):
    return "+254" + local[1:]


def pay(client, **overrides):
    """An order the sandbox pays (after SANDBOX_CALLBACK_DELAY); the order once completed."""
    order = client.post("/api/orders", json={**DEMO, **overrides}).get_json()
    return wait_until(lambda: (body := client.get(f"/api/orders/{order['id']}").get_json())["status"] == "completed"
                      and body, message="the order to be paid")


def outbox(app, order_id=None):
    with app.app_context():
        query = select(OutboxMessage).order_by(OutboxMessage.id)
        if order_id is not None:
            query = query.where(OutboxMessage.order_id == order_id)
        found = {(m.order_id, m.channel): m for m in db.session.scalars(query)}
        db.session.remove()
        return found


def counted(channel, outcome):
    return metrics.registry.get_sample_value("eventi_messages_total", {"channel": channel, "outcome": outcome}) or 0.0


def link_in(text):
    return re.search(r"http\S+/t/\S+", text).group(0)


def linked_order(app, link):
    """The order a ticket link names, as the app reads its token."""
    with app.app_context():
        return order_id_from_token(link.rsplit("/t/", 1)[1])


def assert_email_is_the_tickets(message, order, app=None):
    """Subject, both parts, the link, and each ticket's QR code inline, decoded as a gate's scanner would."""
    from PIL import Image
    from pyzbar.pyzbar import decode

    assert message["Subject"] == "Your tickets for Test This End to End"
    assert message["From"] == MAIL_FROM
    plain, html = message.get_body(("plain",)).get_content(), message.get_body(("html",)).get_content()
    codes = [ticket["code"] for ticket in order["tickets"]]
    for code in codes:
        assert code in plain and code in html
    assert app is None or linked_order(app, link_in(plain)) == order["id"]
    assert link_in(plain) in html
    images = [part for part in message.walk() if part.get_content_type() == "image/png"]
    assert len(images) == len(codes)
    for image in images:
        assert f"cid:{image['Content-ID'].strip('<>')}" in html  # shown inline, where the HTML puts it
        scanned = [found.data.decode() for found in decode(Image.open(io.BytesIO(image.get_content())))]
        assert scanned in [[code] for code in codes]


# -- what the buyer receives --

def test_a_paid_orders_sms_and_email_leave_within_5_seconds(app, client, wire, smtp, sms_provider, sender):
    order = pay(client, quantity=2)
    completed_at = time.monotonic()
    wait_until(lambda: sms_provider.to(phone(DEMO["phone"])) and smtp.to(DEMO["email"]), timeout=5,
               message="the SMS and the email")
    assert time.monotonic() - completed_at < 5

    (headers, form), = sms_provider.received
    assert headers["apikey"] == "at-key-123" and headers["accept"] == "application/json"
    assert form["username"] == "eventi" and form["from"] == "EVENTI" and form["to"] == "+254712345678"
    receipt = order["payment"]["receipt"]
    assert form["message"].startswith(f"Test This End to End: 2 ticket(s) paid, receipt {receipt}. "
                                      f"Show them at the gate: {PUBLIC}/t/")
    assert linked_order(app, link_in(form["message"])) == order["id"]
    assert gsm_length(form["message"]) <= SMS_LIMIT
    mail, = smtp.messages()
    assert_email_is_the_tickets(mail, order, app)
    messages = wait_until(lambda: (found := outbox(app, order["id"])) and {m.state for m in found.values()} == {"sent"}
                          and found, message="both recorded as sent")
    assert len(messages) == 2
    assert messages[order["id"], "sms"].provider_message_id.startswith("ATXid_")


@pytest.mark.live
def test_the_web_workers_send_within_5_seconds_under_gunicorn(live_server_factory, smtp, sms_provider):
    server = live_server_factory(**messaging_env(smtp, sms_provider), SANDBOX_CALLBACK_DELAY="0.2", WEB_CONCURRENCY="2")
    order = server.create_order()
    paid = wait_until(lambda: (body := requests.get(f"{server.url}/api/orders/{order['id']}").json())["status"]
                      == "completed" and body, message="the order to be paid")
    completed_at = time.monotonic()
    wait_until(lambda: sms_provider.to(phone(DEMO["phone"])) and smtp.to(DEMO["email"]), timeout=5,
               message="the SMS and the email")
    assert time.monotonic() - completed_at < 5
    assert_email_is_the_tickets(smtp.to(DEMO["email"])[0], paid)
    assert link_in(sms_provider.to(phone(DEMO["phone"]))[0]["message"]).startswith(f"{server.url}/t/")


@pytest.mark.parametrize("code, outcome", [
    (100, "sent"), (101, "sent"), (102, "sent"),
    *[(code, "failed for good") for code in (401, 402, 403, 404, 406, 407)],
    *[(code, "tried again") for code in (405, 409, 500, 501, 502)]])
def test_africas_talking_status_codes_are_read_as_its_documentation_says(sms_provider, code, outcome):
    from eventi_flask.messages.delivery import SendFailed
    from eventi_flask.messages.sms import AfricasTalking

    def africas_talking(base_url):
        return AfricasTalking(vars(Config({"SMS_MODE": "africastalking", "AFRICASTALKING_USERNAME": "eventi",
                                           "AFRICASTALKING_API_KEY": "k", "AFRICASTALKING_BASE_URL": base_url})))

    sms = africas_talking(sms_provider.url)
    sms_provider.codes["+254712345678"] = code
    try:
        said = "sent" if sms.send("254712345678", "hello").startswith("ATXid_") else "no id"
    except SendFailed as exc:
        said = "failed for good" if exc.permanent else "tried again"
    assert said == outcome
    sms_provider.http_status = 500  # any HTTP error, and no answer at all: tried again
    with pytest.raises(SendFailed, match="HTTP 500") as refused:
        sms.send("254712345678", "hello")
    assert not refused.value.permanent
    with pytest.raises(SendFailed, match="unreachable") as unreachable:
        africas_talking(f"http://127.0.0.1:{free_port()}").send("254712345678", "hello")
    assert not unreachable.value.permanent


def test_email_goes_over_starttls_with_the_urls_login(tmp_path, monkeypatch):
    from datetime import datetime, timezone

    from eventi_flask.messages.delivery import SendFailed
    from eventi_flask.messages.email import SmtpMailer
    from eventi_flask.messages.service import TicketMessage

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the server's certificate is the one this client trusts
    server = SmtpServer(tmp_path / "mail", secured=(cert, key, "eventi", "p@ss word")).start()
    ticket = TicketMessage("order-1", "Wanjiku", 1, "SKQ96C7K7H", "Sauti Live", "Uhuru Gardens",
                           datetime(2027, 2, 14, 16, tzinfo=timezone.utc), "VIP", ["AB12-CD34-EF56"])
    try:
        def mailer(password):
            return SmtpMailer({"SMTP_URL": f"smtp://eventi:{password}@127.0.0.1:{server.port}", "MAIL_FROM": MAIL_FROM})

        with pytest.raises(SendFailed, match="SMTPAuthenticationError") as refused:
            mailer("wrong").send("wanjiku@example.com", ticket, "https://e.co/t/x")
        assert not refused.value.permanent
        mailer("p%40ss%20word").send("wanjiku@example.com", ticket, "https://e.co/t/x")  # the URL's quoting undone
        mail, = server.messages()
        assert mail["Subject"] == "Your tickets for Sauti Live"
        assert "Sun 14 February 2027, 7:00 pm EAT" in mail.get_body(("plain",)).get_content()
    finally:
        server.stop()


def test_sms_text_is_one_gsm_sms_whatever_the_event_is_called():
    link = "https://tickets.example.co.ke/t/" + "x" * 50
    short = sms_text("Sauti Live", 1, "SKQ96C7K7H", link)
    assert short == f"Sauti Live: 1 ticket(s) paid, receipt SKQ96C7K7H. Show them at the gate: {link}"
    long_name = sms_text("The Great Nairobi Festival of Sound, Light and Everything Else " * 3, 10, "SKQ96C7K7H", link)
    assert gsm_length(long_name) <= SMS_LIMIT and long_name.startswith("The Great") and "...: 10 ticket(s)" in long_name
    assert long_name.endswith(link)
    # Outside GSM's alphabet a single character would make the whole SMS UCS-2 (70 characters).
    accented = sms_text("Ngũgĩ’s Night 🎶 {live}", 1, "SKQ96C7K7H", "https://e.co/t/x")
    assert accented.startswith("Ngugi?s Night ? {live}:") and gsm_length(accented) <= SMS_LIMIT


# -- nothing lost --

def test_with_the_providers_down_for_a_while_every_message_is_delivered_once(app, client, wire, smtp, sms_provider,
                                                                            sender):
    retried_before = counted("email", "retried"), counted("sms", "retried")
    smtp.stop()
    sms_provider.http_status = 503
    orders = [pay(client, email=f"buyer{n}@example.com", phone=f"071234567{n}") for n in range(3)]
    pending = wait_until(lambda: (found := outbox(app)) and len(found) == 6
                         and all(m.attempts >= 3 and m.state == "pending" for m in found.values()) and found,
                         timeout=15, message="three attempts each, still pending")
    assert all(m.last_error for m in pending.values())
    assert counted("email", "retried") - retried_before[0] >= 6 and counted("sms", "retried") - retried_before[1] >= 6
    smtp.start()
    sms_provider.http_status = None
    wait_until(lambda: all(m.state == "sent" for m in outbox(app).values()), timeout=10, message="all sent")
    for n, order in enumerate(orders):
        assert len(smtp.to(f"buyer{n}@example.com")) == 1
        assert len(sms_provider.to(phone(f"071234567{n}"))) == 1
    assert all(client.get(f"/api/orders/{o['id']}").get_json() == o for o in orders)  # untouched by all this


def test_messages_committed_by_a_worker_that_died_before_sending_are_sent_by_the_next(app, settings, client, wire,
                                                                                       smtp, sms_provider):
    order = pay(client)  # no sender runs in this app: as if its worker died right after the commit
    assert {m.state for m in outbox(app, order["id"]).values()} == {"pending"}
    assert not smtp.messages() and not sms_provider.received
    successor = create_app(app_config.TestConfig(settings))
    start_sender(successor)
    try:
        wait_until(lambda: smtp.to(DEMO["email"]) and sms_provider.to(phone(DEMO["phone"])), timeout=5,
                   message="the new worker to send them")
    finally:
        shut_down(successor)
    assert len(smtp.messages()) == 1 and len(sms_provider.received) == 1


@pytest.mark.live
def test_the_procfile_worker_process_sends_what_the_web_workers_committed(live_server_factory, smtp, sms_provider):
    """MESSAGES_SENDER=process: gunicorn's workers do not send; the Procfile's worker: does, when it starts."""
    env = {**messaging_env(smtp, sms_provider), "MESSAGES_SENDER": "process", "SANDBOX_CALLBACK_DELAY": "0.2"}
    server = live_server_factory(**env)
    order = server.create_order()
    wait_until(lambda: requests.get(f"{server.url}/api/orders/{order['id']}").json()["status"] == "completed",
               message="the order to be paid")
    with psycopg.connect(server.env["DATABASE_URL"]) as connection:
        states = connection.execute("SELECT channel, state FROM outbox_messages").fetchall()
    assert sorted(states) == [("email", "pending"), ("sms", "pending")]
    worker = subprocess.Popen(procfile_command("worker"), cwd=ROOT, env=server.env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: smtp.to(DEMO["email"]) and sms_provider.to(phone(DEMO["phone"])), timeout=15,
                   message="the worker process to send them")
    finally:
        worker.terminate()
        worker.wait(10)
    assert len(smtp.messages()) == 1 and len(sms_provider.received) == 1


@pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
def test_two_senders_racing_send_each_message_once(app, settings, client, wire, smtp, sms_provider):
    orders = [pay(client, email=f"racer{n}@example.com", phone=f"07220000{n:02d}") for n in range(12)]
    other = create_app(app_config.TestConfig(settings))
    for each in (app, other):
        start_sender(each)
    try:
        wait_until(lambda: all(m.state == "sent" for m in outbox(app).values()), timeout=15, message="all sent")
    finally:
        stop_sender(app)
        shut_down(other)
    assert len(outbox(app)) == 2 * len(orders)
    assert all(m.attempts == 1 for m in outbox(app).values())  # each claimed once, by one of them
    assert len(smtp.messages()) == len(orders) and len(sms_provider.received) == len(orders)
    assert sorted(message["To"] for message in smtp.messages()) == sorted(f"racer{n}@example.com" for n in range(12))


# -- in batches: the database's work per batch, not per message --

def complete_orders(app, count, prefix="batch"):
    """`count` orders completed at once, as a sale's callbacks would leave them: each with its ticket and its
    messages queued (outbox_rows, as the completion makes them), in one commit; their receipts
    by order id."""
    with app.app_context():
        ticket_type = db.session.scalars(select(TicketType).where(TicketType.code == DEMO["ticket_type"])).one()
        orders = [Order(status="completed", ticket_type_id=ticket_type.id, quantity=1, amount=ticket_type.price,
                        name="Buyer", email=f"{prefix}{n}@example.com", phone=f"2547{n:08d}",
                        receipt=f"R{secrets.token_hex(5).upper()}") for n in range(count)]
        db.session.add_all(orders)
        db.session.flush()
        db.session.add_all(Ticket(order_id=order.id, code=secrets.token_hex(8).upper()) for order in orders)
        queued = [row for order in orders for row in outbox_rows({"id": order.id, "phone": order.phone,
                                                                  "email": order.email})]
        db.session.execute(insert(OutboxMessage), queued)
        wake_after_commit(db.session)
        db.session.commit()
        receipts = {order.id: order.receipt for order in orders}
        db.session.remove()
        return receipts


@pytest.fixture
def statements(app):
    counted = Statements(app)
    yield counted
    counted.close()


def sandbox_lines(log_lines):
    return [line for line in log_lines if "SMS not sent (SMS_MODE=sandbox)" in line]


def receipts_texted(log_lines):
    """The receipt each sandbox SMS carries (the log masks the phone number), as many times as it was sent."""
    return sorted(re.search(r"receipt (\S+)\.", line).group(1) for line in sandbox_lines(log_lines))


@pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
@pytest.mark.env(SMS_MODE="sandbox", SMTP_URL=None)
def test_200_orders_completed_at_once_are_sent_in_a_handful_of_statements_each_once(app, statements, log_lines):
    receipts = complete_orders(app, 200)
    statements.seen.clear()
    with app.app_context():
        handled = Sender(app, sending=True, in_web_worker=True).send_due()
        db.session.remove()
    assert handled == 200
    # 2 batches of 100, each a claim, two reads (orders, tickets), a lock of the claims still held and one
    # executemany recording every outcome; then the empty claim that ends the round.  It was 3 statements (and
    # 2 commits) a message.
    assert statements.seen == ["WITH", "SELECT", "SELECT", "SELECT", "UPDATE"] * 2 + ["WITH"]
    assert {(m.state, m.attempts) for m in outbox(app).values()} == {("sent", 1)}
    assert receipts_texted(log_lines) == sorted(receipts.values())  # each order's SMS, once
    assert all(f"SMS for order {order_id} sent" in log_lines for order_id in receipts)


@pytest.fixture
def texted(monkeypatch):
    """Every SMS handed to Africa's Talking (or its sandbox) in this process, as (phone, text)."""
    from eventi_flask.messages.sms import AfricasTalking

    sent, send = [], AfricasTalking.send
    monkeypatch.setattr(AfricasTalking, "send", lambda self, phone, text: sent.append((phone, text)) or
                        send(self, phone, text))
    return sent


@pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
@pytest.mark.env(SMS_MODE="sandbox")
def test_two_senders_on_one_database_share_the_batches_and_never_send_one_twice(app, settings, smtp, texted):
    complete_orders(app, 150)  # 300 messages: 3 batches
    other = create_app(app_config.TestConfig({k: v for k, v in settings.items() if v is not None}))
    senders = [Sender(each, sending=True, in_web_worker=True) for each in (app, other)]

    def send_all(sender):
        with sender.app.app_context():
            try:
                return sender.send_due()
            finally:
                db.session.remove()

    try:
        racing = [gevent.spawn(send_all, sender) for sender in senders]
        gevent.joinall(racing, timeout=60, raise_error=True)
    finally:
        shut_down(other)
    handled = [greenlet.value for greenlet in racing]
    assert sum(handled) == 300 and all(handled), handled  # SKIP LOCKED: each claimed batches of its own
    assert {(m.state, m.attempts) for m in outbox(app).values()} == {("sent", 1)}
    assert sorted(phone for phone, _ in texted) == sorted(f"2547{n:08d}" for n in range(150))
    assert sorted(mail["To"] for mail in smtp.messages()) == sorted(f"batch{n}@example.com" for n in range(150))


@pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
@pytest.mark.env(SMS_MODE="sandbox", SMTP_URL=None)
def test_a_sales_completions_are_gathered_into_one_claim(app, statements, log_lines):
    start_sender(app)
    wait_until(lambda: statements.claims() >= 1, message="the sender's first look")  # at its start: nothing due
    claims_before = statements.claims()
    for _ in range(10):  # ten callbacks' commits, each waking the sender, within its GATHER
        complete_orders(app, 1)
    wait_until(lambda: {(m.state, m.attempts) for m in outbox(app).values()} == {("sent", 1)}, timeout=5,
               message="the ten SMS sent")
    assert statements.claims() - claims_before <= 2  # not a round per commit
    assert len(sandbox_lines(log_lines)) == 10


@pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
@pytest.mark.env(SMS_MODE="sandbox", SMTP_URL=None)
def test_claimed_messages_not_started_before_their_claim_could_end_are_given_back(app, monkeypatch, log_lines):
    complete_orders(app, 3)
    monkeypatch.setattr(sender_module, "LONGEST_SEND", sender_module.LEASE * 2)  # no send may start
    with app.app_context():
        assert Sender(app, sending=True).send_due() == 3
        db.session.remove()
    assert not sandbox_lines(log_lines)
    messages = outbox(app).values()
    assert {(m.state, m.attempts) for m in messages} == {("pending", 0)}  # as if never claimed
    assert all(as_utc(m.next_attempt_at) <= utcnow() for m in messages)  # due again at once, not after the lease
    assert any("3 claimed message(s) not started" in line for line in log_lines)


# -- refused for good --

def test_a_number_the_provider_refuses_is_marked_failed_and_the_order_is_unchanged(app, client, wire, smtp,
                                                                                    sms_provider, sender, log_lines):
    failed_before = counted("sms", "failed")
    order = pay(client, phone=REFUSED_PHONE, email="refused-mailbox@example.com")
    wait_until(lambda: {m.state for m in outbox(app, order["id"]).values()} == {"failed"}, timeout=5,
               message="both marked failed")
    messages = outbox(app, order["id"])
    assert "403 InvalidPhoneNumber" in messages[order["id"], "sms"].last_error
    assert "550" in messages[order["id"], "email"].last_error
    assert all(m.attempts == 1 for m in messages.values())  # not tried again
    assert counted("sms", "failed") == failed_before + 1
    assert any(f"SMS for order {order['id']} failed, refused for good" in line for line in log_lines)
    assert client.get(f"/api/orders/{order['id']}").get_json() == order
    assert client.get(f"/orders/{order['id']}").status_code == 200


def test_the_sandbox_writes_the_sms_to_the_log_and_sends_nothing(app, client, wire, sms_provider, sender, log_lines):
    app.config["SMS_MODE"] = "sandbox"
    start_sender(app).sms.mode = "sandbox"
    order = pay(client)
    line = wait_until(lambda: next((line for line in log_lines if "SMS not sent (SMS_MODE=sandbox)" in line), None),
                      timeout=5, message="the sandbox's log line")
    assert f"Test This End to End: 1 ticket(s) paid, receipt {order['payment']['receipt']}" in line
    assert not sms_provider.received


def test_channels_the_page_can_name():
    assert delivery_channels(vars(Config({}))) == ()  # the SMS sandbox reaches no one: keep the link
    assert delivery_channels(vars(Config({"SMS_MODE": "off"}))) == ()
    assert delivery_channels(vars(Config({"SMS_MODE": "africastalking", "AFRICASTALKING_USERNAME": "u",
                                     "AFRICASTALKING_API_KEY": "k", "SMTP_URL": "smtps://u:p@mail.example.com",
                                     "MAIL_FROM": "t@example.com"}))) == ("sms", "email")


@pytest.mark.parametrize("env, problem", [
    ({"SMTP_URL": "smtp://mail.example.com:587"}, "MAIL_FROM is required but not set"),
    ({"SMTP_URL": "mail.example.com"}, "SMTP_URL must look like smtp://"),
    ({"SMS_MODE": "africastalking", "AFRICASTALKING_USERNAME": "eventi"}, "AFRICASTALKING_API_KEY is required"),
    ({"SMS_MODE": "whatsapp"}, "SMS_MODE must be one of sandbox, africastalking, off"),
    ({"MESSAGES_SENDER": "cron"}, "MESSAGES_SENDER must be one of web, process"),
])
def test_a_messaging_setting_mistake_is_one_line_naming_it(env, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        Config(env)


# -- the operator --

def test_orders_show_lists_each_message_and_resend_sends_them_again(app, client, wire, smtp, sms_provider, sender,
                                                                      cli):
    order = pay(client)
    wait_until(lambda: {m.state for m in outbox(app, order["id"]).values()} == {"sent"}, timeout=5, message="sent")
    shown = cli("orders", "show", order["id"])
    assert shown.exit_code == 0
    assert re.search(r"sms message\s+sent \(attempt 1\): ATXid_", shown.output)
    assert re.search(r"email message\s+sent \(attempt 1\)", shown.output)

    resent = cli("messages", "resend", order["id"])
    assert resent.exit_code == 0, resent.output
    assert f"Order {order['id']}: sms sent" in resent.output and f"Order {order['id']}: email sent" in resent.output
    assert len(smtp.to(DEMO["email"])) == 2 and len(sms_provider.to(phone(DEMO["phone"]))) == 2


def test_resend_refuses_what_it_cannot_send_in_one_line(app, client, wire, smtp, sms_provider, cli):
    unknown = cli("messages", "resend", "no-such-order")
    assert unknown.exit_code == 1 and unknown.output == "Error: No order with the id 'no-such-order'.\n"
    pending = client.post("/api/orders", json={**DEMO, "phone": "0708000004"}).get_json()  # never called back
    refused = cli("messages", "resend", pending["id"])
    assert refused.exit_code == 1
    assert refused.output == f"Error: Order {pending['id']} is pending: only a completed order has tickets to send.\n"
    paid = pay(client, phone=REFUSED_PHONE)
    failed = cli("messages", "resend", paid["id"])
    assert failed.exit_code == 1
    assert f"Order {paid['id']}: sms failed: Africa's Talking: statusCode 403" in failed.output
