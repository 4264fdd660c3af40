"""resets: does our server reset a kept-alive connection under load, and is a callback lost to it? (issue 24)

While buyers arrive at --rate (600/s, twice capacity) for --buyers (6,000: 10 s) through whole
journeys, sandbox callbacks included, a PayHero-like sender posts a success callback at
--callback-rate (200/s) for each of its own orders (written to the database beforehand) over
kept-alive connections (a requests.Session, --sender-connections threads), each sent ONCE and
never again, as PayHero does.  Counted: the sender's failures by kind (reset, closed without an
answer, timeout, 5xx), its orders not completed (lost), the buyers' orders left pending once the
journeys are over (lost by the sandbox), and the server log's sandbox retries and give-ups.
Target: no callback lost (none pending), run after run.
"""
import asyncio
import collections
import json
import re
import threading
import time
from pathlib import Path

import requests

from eventi_flask.payhero.sandbox import SUCCESS, classic_callback

from . import journeys
from .server import database_engine

SERVER = journeys.SERVER
SENDER_PHONE = "254708000004"  # the sandbox never calls back for it: these callbacks are the sender's alone


def add_arguments(parser):
    journeys.add_arguments(parser, rate=600, buyers=6000)
    parser.add_argument("--callback-rate", type=float, default=200, help="the sender's callbacks per second (200)")
    parser.add_argument("--sender-connections", type=int, default=32,
                        help="the sender's threads, each request on one of its kept-alive connections (32)")


def failure_kind(exc):
    text = repr(exc)
    for kind, pattern in (("reset", "ConnectionResetError|reset by peer"),
                          ("closed without an answer", "RemoteDisconnected|closed connection without"),
                          ("refused", "ConnectionRefusedError"), ("timeout", "Timeout|timed out")):
        if re.search(pattern, text):
            return kind
    return type(exc).__name__


class Sender:
    """PayHero's side: one success callback per order, paced, open loop, over kept-alive connections."""

    def __init__(self, url, token, orders, rate, connections):
        self.url, self.orders, self.rate = f"{url}/api/payhero/callback?token={token}", orders, rate
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=connections, pool_block=True)
        self.session.mount("http://", adapter)
        self.connections = connections
        self.failures = collections.Counter()
        self.first_failures = []

    def send(self, order):
        payment = order["payment"]
        body = json.dumps(classic_callback(payment["reference"], payment["checkout_request_id"], order["id"],
                                           order["amount"], SENDER_PHONE, *SUCCESS))
        try:
            response = self.session.post(self.url, data=body, headers={"Content-Type": "application/json"},
                                         timeout=(5, 30))
        except requests.RequestException as exc:
            self.failures[failure_kind(exc)] += 1
            self.first_failures.append(repr(exc)[:200])
            return
        if response.status_code != 200:
            self.failures[f"status {response.status_code}"] += 1
            self.first_failures.append(f"{response.status_code} {response.text[:120]}")

    def run(self):
        queue = collections.deque()
        ready = threading.Semaphore(0)

        def worker():
            while True:
                ready.acquire()
                order = queue.popleft()
                if order is None:
                    return
                self.send(order)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.connections)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        for i, order in enumerate(self.orders):
            due = started + i / self.rate
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
            queue.append(order)
            ready.release()
        for _ in threads:
            queue.append(None)
            ready.release()
        for thread in threads:
            thread.join()
        self.session.close()


def unsettled(database_url):
    """(the sender's orders not completed, the buyers' orders still pending): callbacks lost."""
    from sqlalchemy import text

    engine = database_engine(database_url)
    try:
        with engine.connect() as connection:
            return tuple(connection.execute(text(
                "SELECT count(*) FILTER (WHERE phone = :sender AND status <> 'completed'),"
                "       count(*) FILTER (WHERE phone <> :sender AND status = 'pending') FROM orders"),
                {"sender": SENDER_PHONE}).one())
    finally:
        engine.dispose()


def server_log_counts(path):
    text = Path(path).read_text(errors="replace") if path else ""
    return {"sandbox_retries": len(re.findall(r"Sandbox PayHero callback for \S+ failed", text)),
            "sandbox_retries_after_reset": len(re.findall(r"Sandbox PayHero callback for \S+ failed.*reset", text)),
            "sandbox_gave_up": text.count("Sandbox PayHero gave up"),
            "tracebacks": text.count("Traceback")}


async def run(args, target):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.support import pending_orders_made_a_while_ago

    seconds = args.buyers / args.rate
    orders = pending_orders_made_a_while_ago(target["database_url"], int(args.callback_rate * seconds))
    sender = Sender(target["url"], args.token, orders, args.callback_rate, args.sender_connections)
    sending = asyncio.get_running_loop().run_in_executor(None, sender.run)
    result = await journeys.run(args, target)
    await sending
    if result["duplicate_orders"] is not None:  # the journeys counted the sender's orders as buyers' duplicates
        result["failures"] = [f for f in result["failures"] if not f.endswith(" duplicate orders")]
        result["orders_in_database"] -= len(orders)
        result["duplicate_orders"] -= len(orders)
        if result["duplicate_orders"]:
            result["failures"].append(f"{result['duplicate_orders']} duplicate orders")
    sender_pending, buyers_pending = unsettled(target["database_url"])
    result.update({
        "sender_callbacks": len(orders),
        "sender_failures": dict(sender.failures),
        "first_sender_failures": sender.first_failures[:5],
        "sender_orders_pending": sender_pending,  # not completed: its one callback did not land
        "buyer_orders_pending": buyers_pending,
        **server_log_counts(target.get("log")),
    })
    lost = sender_pending + buyers_pending
    if lost:
        result["failures"].append(f"{lost} callbacks lost: {sender_pending} of the sender's orders and "
                                  f"{buyers_pending} of the buyers' still pending")
    return result


def summary(result):
    return (f"sender: {result['sender_callbacks']} callbacks, failures {result['sender_failures'] or 'none'}, "
            f"{result['sender_orders_pending']} orders left pending; buyers: {result['buyers']} at "
            f"{result['arrival_rate']:g}/s, shed {result['shed']}, {result['buyer_orders_pending']} orders left "
            f"pending; sandbox retries {result['sandbox_retries']} ({result['sandbox_retries_after_reset']} after "
            f"a reset), gave up {result['sandbox_gave_up']}; tracebacks {result['tracebacks']}")
