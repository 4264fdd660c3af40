"""What verifying a success callback with PayHero adds to what the customer waits for.

Live mode, in-process, on PostgreSQL and Redis, against a PayHero stand-in: a
local HTTP server speaking transaction-status's wire format that answers SUCCESS
after --delay seconds (300 ms by default).  For each payment a wait is held on
the order, then a success callback is posted; timed are the callback's answer
and callback-sent to wait-answered.  Payments alternate between verification on
and off (PAYHERO_VERIFY_CALLBACKS), so both see the same machine; the added
latency is the difference of the medians.

With --lag L, PayHero's status lags its callback: the stand-in says QUEUED until
L seconds after it is first asked about a payment, so the callback's own check
fails and the worker's re-verification (PAYHERO_REVERIFY_AFTER, its defaults)
completes the order; every payment is verified, and timed the same way.

    .venv/bin/python scripts/bench_verify.py [-n 30] [--delay 0.3] [--lag 3]
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from urllib.parse import parse_qs  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support import REDIS_URL, create_database, drop_database, wait_until  # noqa: E402

TOKEN = "bench-token"


class NoDelayServer(WSGIServer):
    """pywsgi writes an answer in pieces: with Nagle on, a kept-alive connection stalls 40 ms on
    the client's delayed ACK, a stall of this stand-in's that PayHero's web servers do not have."""

    def handle(self, sock, address):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return super().handle(sock, address)


def payhero_stand_in(delay, lag):
    """transaction-status as PayHero documents it, after `delay` seconds: SUCCESS for any reference,
    from `lag` seconds after it was first asked about (QUEUED until then)."""
    expected = "Basic " + base64.b64encode(b"bench:bench").decode()
    first_asked = {}

    def app(environ, start_response):
        if environ["PATH_INFO"] != "/api/v2/transaction-status" or environ.get("HTTP_AUTHORIZATION") != expected:
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [b'{"error_code": "not_found", "error_message": "no such route", "status_code": 404}']
        gevent.sleep(delay)
        reference = parse_qs(environ["QUERY_STRING"])["reference"][0]
        now = time.monotonic()
        paid = now - first_asked.setdefault(reference, now) >= lag
        body = {"transaction_date": "2026-11-26T08:41:14.160604Z", "provider": "m-pesa", "success": True,
                "merchant": "Eventi", "payment_reference": "", "third_party_reference": "SKQ96C7K7H",
                "status": "SUCCESS" if paid else "QUEUED", "reference": reference, "CheckoutRequestID": "", "provider_reference": "SKQ96C7K7H"}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]

    server = NoDelayServer(("127.0.0.1", 0), app, log=None)
    server.start()
    return server


def summary(values):
    values = sorted(values)
    return (f"median {statistics.median(values) * 1000:7.1f} ms, p90 {values[int(len(values) * 0.9)] * 1000:7.1f} ms, "
            f"max {values[-1] * 1000:7.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="payments per mode")
    parser.add_argument("--delay", type=float, default=0.3, help="seconds the stand-in takes to answer")
    parser.add_argument("--lag", type=float, default=0, help="seconds PayHero's status lags its callback")
    args = parser.parse_args()

    from config import Config
    from eventi_flask import create_app
    from eventi_flask.extensions import db
    from eventi_flask.notify.service import HUB
    from eventi_flask.events.commands import seed_demo
    from eventi_flask.orders.models import Order
    from eventi_flask.payhero.sandbox import classic_callback

    stand_in = payhero_stand_in(args.delay, args.lag)
    name, url = create_database("bench_verify")
    try:
        app = create_app(Config({
            "DATABASE_URL": url, "REDIS_URL": REDIS_URL, "REDIS_PREFIX": f"{name}:", "LOG_LEVEL": "WARNING",
            "PAYHERO_MODE": "live", "PAYHERO_BASE_URL": f"http://127.0.0.1:{stand_in.server_port}",
            "PAYHERO_API_USERNAME": "bench", "PAYHERO_API_PASSWORD": "bench", "PAYHERO_CHANNEL_ID": "1",
            "PAYHERO_CALLBACK_TOKEN": TOKEN,
        }))
        with app.app_context():
            db.create_all()
            ticket_type = seed_demo().ticket_types[0]
            orders = [Order(ticket_type_id=ticket_type.id, quantity=1, amount=ticket_type.price, name="Bench",
                            email="bench@example.com", phone="254712345678", version=1,
                            payhero_reference=f"REF-{uuid.uuid4()}", checkout_request_id=f"ws_CO_{i}")
                      for i in range(2 * args.n + 4)]
            db.session.add_all(orders)
            db.session.commit()
            payments = [(o.id, json.dumps(classic_callback(o.payhero_reference, o.checkout_request_id, o.id, o.amount,
                                                           o.phone, 0, "The service request is processed successfully.")))
                        for o in orders]
        client, hub = app.test_client(), app.extensions[HUB]
        timings = {True: [], False: []}

        def pay(order_id, body, verify):
            app.config["PAYHERO_VERIFY_CALLBACKS"] = verify
            answered = {}

            def wait():
                response = client.get(f"/api/orders/{order_id}/wait", query_string={"since": 1, "timeout": 30})
                answered["at"], answered["status"] = time.perf_counter(), response.get_json()["status"]

            waiting = gevent.spawn(wait)
            wait_until(lambda: hub.waiter_count == 1, interval=0.001, message="the wait to be held")
            sent = time.perf_counter()
            response = client.post(f"/api/payhero/callback?token={TOKEN}", data=body, content_type="application/json")
            callback_answered = time.perf_counter()
            waiting.join(timeout=30)
            assert response.status_code == 200 and answered.get("status") == "completed", (response.json, answered)
            return callback_answered - sent, answered["at"] - sent

        lagging = args.lag > 0  # then every payment is verified, and only n + 2 are made (each takes seconds)
        warm_up = 2 if lagging else 4  # the first two of each mode warm up connections and compiled statements
        for i, (order_id, body) in enumerate(payments[:args.n + warm_up] if lagging else payments):
            verify = lagging or i % 2 == 0
            timing = pay(order_id, body, verify)
            if i >= warm_up:
                timings[verify].append(timing)
        lag = f", its status lagging the callback by {args.lag:g} s" if lagging else ""
        print(f"PayHero stand-in answering transaction-status in {args.delay * 1000:.0f} ms{lag}; "
              f"{args.n} payments a mode")
        for verify in (True,) if lagging else (False, True):
            label = "verified  " if verify else "unverified"
            print(f"{label} callback answered:     {summary([c for c, _ in timings[verify]])}")
            print(f"{label} wait answered after:   {summary([w for _, w in timings[verify]])}")
        if not lagging:
            added = (statistics.median(w for _, w in timings[True]) - statistics.median(w for _, w in timings[False]))
            print(f"added by verification (median wait): {added * 1000:.1f} ms, of which beyond the stand-in's "
                  f"{args.delay * 1000:.0f} ms: {added * 1000 - args.delay * 1000:.1f} ms")
    finally:
        stand_in.stop()
        drop_database(name)


if __name__ == "__main__":
    main()
