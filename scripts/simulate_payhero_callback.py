#!/usr/bin/env python3
"""Post a PayHero callback for an order to a running server, as PayHero would.

    scripts/simulate_payhero_callback.py ORDER_ID [--outcome success|cancelled|insufficient|wrong-pin|unreachable|expired]
        [--result-code N] [--amount KES] [--shape classic|flat] [--url http://127.0.0.1:8000] [--token sandbox]

The amount defaults to the order's own (read from the server); give --amount to try a mismatch.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from eventi_flask.payhero.sandbox import result_description, sandbox_callback  # noqa: E402

OUTCOMES = {"success": 0, "cancelled": 1032, "insufficient": 1, "wrong-pin": 2001, "unreachable": 1037, "expired": 1019}


def build_callback(order, result_code, amount, shape):
    return sandbox_callback(shape, order["payment"]["reference"] or "SIMULATED",
                            order["payment"]["checkout_request_id"] or "ws_CO_simulated", order["id"],
                            amount, "254708000000", result_code, result_description(result_code))


def send_callback(session, base_url, token, order, result_code=0, amount=None, shape="classic"):
    body = build_callback(order, result_code, order["amount"] if amount is None else amount, shape)
    return session.post(f"{base_url}/api/payhero/callback", params={"token": token}, json=body, timeout=10)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("order_id")
    parser.add_argument("--outcome", choices=OUTCOMES, default="success")
    parser.add_argument("--result-code", type=int, help="any M-Pesa ResultCode; overrides --outcome")
    parser.add_argument("--amount", type=int)
    parser.add_argument("--shape", choices=("classic", "flat"), default="classic")
    parser.add_argument("--url", default=os.environ.get("EVENTI_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("PAYHERO_CALLBACK_TOKEN", "sandbox"))
    args = parser.parse_args()

    session = requests.Session()
    order = session.get(f"{args.url}/api/orders/{args.order_id}", timeout=10)
    if order.status_code != 200:
        sys.exit(f"order {args.order_id}: {order.status_code} {order.text}")
    code = args.result_code if args.result_code is not None else OUTCOMES[args.outcome]
    response = send_callback(session, args.url, args.token, order.json(), code, args.amount, args.shape)
    print(response.status_code, json.dumps(response.json()))
    sys.exit(0 if response.ok else 1)


if __name__ == "__main__":
    main()
