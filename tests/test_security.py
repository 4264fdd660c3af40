"""Security headers on every response, and logs that never carry a phone number, an email or a token."""
import io
import logging
import re

import pytest
import requests

from tests.support import DEMO, wait_until

TOKEN = "tok-9f2c41d7e8a3b6"
SECRETS = ("712345678", "wanjiku@example.com", TOKEN)  # the phone in any of its forms, the email, the token


def assert_security_headers(response):
    csp = response.headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'" and directives["default-src"] == "'self'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
    assert directives["frame-ancestors"] == "'none'" and directives["object-src"] == "'none'"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"


def test_every_kind_of_response_carries_the_security_headers(client, wire):
    order = client.post("/api/orders", json={**DEMO, "phone": "0708000004"})
    assert_security_headers(order)
    order_id = order.get_json()["id"]
    for method, path in [
        ("GET", "/events/test-this-end-to-end/checkout"), ("GET", f"/orders/{order_id}"), ("GET", "/orders/nope"),
        ("GET", "/static/eventi.js"), ("GET", "/static/eventi.css"), ("GET", "/api/events/test-this-end-to-end"),
        ("GET", "/api/events/nope"), ("GET", f"/api/orders/{order_id}/wait?timeout=0"), ("GET", "/healthz"),
        ("GET", "/readyz"), ("GET", "/metrics"), ("POST", "/api/orders"), ("POST", "/api/payhero/callback"),
        ("DELETE", "/api/orders"), ("GET", "/no/such/page"),
    ]:
        response = client.open(path, method=method)
        assert response.status_code < 500, path
        assert_security_headers(response)


@pytest.mark.parametrize("path", ["/events/test-this-end-to-end/checkout", "/orders/{id}"])
def test_pages_have_no_inline_script_for_the_policy_to_block(client, wire, path):
    order_id = client.post("/api/orders", json={**DEMO, "phone": "0708000004"}).get_json()["id"]
    html = client.get(path.format(id=order_id)).get_data(as_text=True)
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S | re.I)
    assert scripts and all("src=" in attributes and not body.strip() for attributes, body in scripts)
    assert not re.search(r"\son[a-z]+\s*=", html, re.I), "inline event handler"
    assert not re.search(r"javascript:", html, re.I)


@pytest.mark.parametrize("level", ["info", "debug"])
def test_logs_never_carry_a_phone_an_email_or_a_token(app, client, wire, level, monkeypatch, caplog):
    ours = logging.getLogger("eventi_flask")  # configured by create_app: read what its handler writes
    handler = next(h for h in ours.handlers if type(h) is logging.StreamHandler)
    written, previous_level = io.StringIO(), ours.level
    previous_stream = handler.setStream(written)
    ours.setLevel(level.upper())
    caplog.set_level(logging.INFO)  # and whatever other libraries log
    monkeypatch.setitem(app.config, "PAYHERO_CALLBACK_TOKEN", TOKEN)
    try:
        order = client.post("/api/orders", json=DEMO).get_json()  # the sandbox calls back with the token
        body = client.get(f"/api/orders/{order['id']}/wait", query_string={"timeout": 10}).get_json()
        assert body["status"] == "completed"
        client.post(f"/api/payhero/callback?token={TOKEN}x", json={"status": True})  # a wrong token
        client.post(f"/api/payhero/callback?token={TOKEN}", data="{not json", content_type="application/json")
        client.post("/api/orders", json={**DEMO, "email": "wanjiku@example"})  # a validation error
        # PayHero refuses, echoing the customer back in its error body, which our warning quotes.
        wire.post(re.compile(r".*/api/v2/payments"), status_code=500,
                  text=f"boom for {DEMO['phone']} {DEMO['email']} {order['payment']['reference']}")
        assert client.post("/api/orders", json=DEMO).status_code == 502
    finally:
        handler.setStream(previous_stream)
        ours.setLevel(previous_level)
    others = [caplog.handler.format(r) for r in caplog.records if not r.name.startswith("eventi_flask")]
    text = "\n".join([written.getvalue(), *others])
    assert "PAYHERO Callback received" in text and "PayHero refused the payment request" in text
    assert order["payment"]["reference"] in text  # the rest of the line survives
    for secret in SECRETS:
        assert secret not in text, secret


@pytest.mark.live
def test_gunicorn_access_log_never_carries_the_token_or_the_customer(live_server_factory):
    server = live_server_factory(GUNICORN_ACCESS_LOG="-", PAYHERO_CALLBACK_TOKEN=TOKEN, SANDBOX_CALLBACK_DELAY="0.2")
    try:
        order = server.create_order()  # DEMO: the phone and email of SECRETS
        response = requests.get(f"{server.url}/api/orders/{order['id']}/wait", params={"timeout": 10}, timeout=20)
        assert response.json()["status"] == "completed"
        # gunicorn writes an access line once the response is sent: the client may read it first.
        lines = ['"POST /api/payhero/callback HTTP/1.1" 200', f"GET /api/orders/{order['id']}/wait HTTP/1.1\" 200"]
        wait_until(lambda: all(line in server.log() for line in lines), message="the access log lines")
        log = server.log()
        for secret in SECRETS:
            assert secret not in log, secret
    finally:
        server.stop()
