#!/usr/bin/env python3
"""Payments against a running server: create an order, hold a wait, fire the callback, time the answer.

    scripts/payment_test.py [--url http://127.0.0.1:8000] [--payments 1] [--token sandbox]

Each payment uses the sandbox phone that never calls back (0708000004), so the
callback this script sends is the only one.  Prints the timeline of the first
payment, then callback-to-answer percentiles and wait requests per payment.
Exits non-zero if any wait did not answer within 1 s of its callback.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gevent  # noqa: E402
import requests  # noqa: E402

from simulate_payhero_callback import send_callback  # noqa: E402

ORDER = {"event": "test-this-end-to-end", "ticket_type": "early-bird", "quantity": 1,
         "name": "Payment Test", "email": "payment-test@example.com", "phone": "0708000004"}
LIMIT = 1.0


def one_payment(session, url, token):
    marks = {"start": time.monotonic()}
    order = session.post(f"{url}/api/orders", json=ORDER, timeout=30)
    order.raise_for_status()
    order = order.json()
    marks["order created"] = time.monotonic()
    waits = []

    def hold():
        since = order["version"]
        while True:  # what the page's client does: ask again with `since` until the order is final
            waits.append(time.monotonic())
            body = session.get(f"{url}/api/orders/{order['id']}/wait", params={"since": since, "timeout": 30},
                               timeout=40).json()
            if body["status"] != "pending":
                return body
            since = body["version"]

    waiting = gevent.spawn(hold)
    gevent.sleep(0.2)  # a customer takes seconds to type a PIN; let the wait be held first
    marks["wait sent"] = waits[0]
    marks["callback sent"] = time.monotonic()
    answer = send_callback(session, url, token, order)
    marks["callback answered"] = time.monotonic()
    final = waiting.get(timeout=60)
    marks["wait answered"] = time.monotonic()
    if answer.status_code != 200 or final["status"] != "completed":
        raise SystemExit(f"payment {order['id']} ended {final['status']} (callback {answer.status_code})")
    return marks, len(waits)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("EVENTI_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--payments", type=int, default=1)
    parser.add_argument("--token", default=os.environ.get("PAYHERO_CALLBACK_TOKEN", "sandbox"))
    args = parser.parse_args()

    session = requests.Session()
    results = [one_payment(session, args.url.rstrip("/"), args.token) for _ in range(args.payments)]

    marks, requests_used = results[0]
    print("timeline of the first payment (ms from start):")
    for name, moment in sorted(marks.items(), key=lambda item: item[1]):
        print(f"  {(moment - marks['start']) * 1000:9.1f}  {name}")
    print(f"  wait requests: {requests_used}")

    latencies = sorted((m["wait answered"] - m["callback sent"]) * 1000 for m, _ in results)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(f"\n{len(results)} payments, callback sent -> wait answered: median {statistics.median(latencies):.1f} ms, "
          f"p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms; wait requests per payment: "
          f"{statistics.mean(n for _, n in results):.2f}")
    late = [x for x in latencies if x > LIMIT * 1000]
    if late:
        sys.exit(f"FAIL: {len(late)} waits answered later than {LIMIT:g} s after their callback")
    print("OK: every wait answered within 1 s of its callback")


if __name__ == "__main__":
    main()
