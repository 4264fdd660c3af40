"""journeys: whole buyer journeys, sandbox PayHero included: buyers arriving at --rate for --buyers.

Each buyer, on its own connection: POST /api/orders with an Idempotency-Key
(a 503 busy or 429 is retried after Retry-After with the same key, as the
checkout page does; a lost connection or no answer in --order-timeout, after
a short backoff); then hold the wait as the status page does (since=version,
asking again after a hold that ran its course, reconnecting after a 503's
Retry-After) until the outcome.  The sandbox calls back after
SANDBOX_CALLBACK_DELAY (2 s); the phones decide the outcome: 85% pay, 10%
cancel (0708000001), 5% lack funds (0708000002).

Outcome after the callback: the sandbox's reference carries the millisecond
it took the payment (its callback is due SANDBOX_CALLBACK_DELAY later), so
outcome_after_callback_ms = page answered - that; outcome_after_commit_ms is
measured from the order's updated_at (the callback's commit).  Both are wall
clock on this one machine.  journeys/s = journeys with an outcome / (last
outcome - first arrival).  With the server's database at hand, duplicate
orders = orders in the database - distinct orders answered to buyers.
"""
import argparse
import asyncio
import json
import uuid
from datetime import datetime

from eventi_flask.payhero.sandbox import read_reference

from . import delivery
from .client import ORDER_BODY, Conn, paced, post_order
from .page import Watch, backoff, follow, story
from .results import count_by, latency, rounded, spread
from .server import Profiler, Usage, database_engine, worker_cpu_total

CALLBACK_DELAY = 2.0
SERVER = {"WEB_CONCURRENCY": "2", "SANDBOX_CALLBACK_DELAY": str(CALLBACK_DELAY)}
SHED = (429, 503)
# Of every 20 buyers: 2 cancel (10%), 1 lacks funds (5%), 17 pay (85%).
CANCELS, LACKS_FUNDS = "0708000001", "0708000002"


def add_arguments(parser, rate=300, buyers=3000, line=False):
    parser.add_argument("--line", action=argparse.BooleanOptionalAction, default=line,
                        help=f"the event's line on (past capacity buyers get a place, 202) or off (503 busy, "
                             f"as before the line); default {'on' if line else 'off'}")
    parser.add_argument("--rate", type=float, default=rate, help=f"buyers arriving per second (default {rate:g})")
    parser.add_argument("-n", "--buyers", type=int, default=buyers, help=f"buyers in all (default {buyers})")
    parser.add_argument("--timeout", type=float, default=55, help="the wait's timeout= (the hold), seconds")
    parser.add_argument("--order-timeout", type=float, default=30,
                        help="seconds a buyer waits for the POST's answer before retrying it (same key)")
    parser.add_argument("--give-up", type=float, default=120, help="seconds after arriving a buyer gives up")
    parser.add_argument("--messages", choices=delivery.MESSAGES, default="sandbox",
                        help="the tickets' SMS and email: sandbox (the SMS logged, no email; the default), deliver "
                             "(to a real SMTP server and an Africa's Talking stand-in, each paid order's counted: "
                             "bench/delivery.py), off (SMS_MODE=off, no SMTP_URL: no outbox, for CPU per journey "
                             "without it)")
    parser.add_argument("--deliver", dest="messages", action="store_const", const="deliver",
                        help="--messages deliver: every paid order must get exactly one SMS and one email")


def phone_and_outcome(i):
    slot = i % 20
    if slot < 2:
        return CANCELS, "cancelled"
    if slot == 2:
        return LACKS_FUNDS, "failed"
    return f"0712{i % 1000000:06d}", "completed"


class Buyer:
    __slots__ = ("index", "phone", "expected", "key", "arrived_at", "served_at", "order_ids", "answers", "watch", "error")

    def __init__(self, index):
        self.index = index
        self.phone, self.expected = phone_and_outcome(index)
        self.key = uuid.uuid4().hex  # its Idempotency-Key, the same on every retry
        self.arrived_at = self.served_at = self.watch = self.error = None
        self.order_ids = set()  # every distinct order the server answered this buyer: exactly one, or a duplicate
        self.answers = []  # (status or error name, ms) of every POST

    def shed(self):
        return sum(1 for status, _ in self.answers if status in SHED)


async def journey(host, port, buyer, args, deadline):
    loop = asyncio.get_running_loop()
    conn = Conn(host, port)
    buyer.arrived_at = loop.time()
    answer = await post_until_answered(conn, buyer, args)
    if answer is None:
        return
    order = answer.json()
    buyer.served_at = loop.time()
    buyer.order_ids.add(order["id"])
    buyer.watch = Watch(order)
    await follow(host, port, buyer.watch, args.timeout, deadline, retry_refused=True, conn=conn)


async def post_until_answered(conn, buyer, args, accepted=(200, 201)):
    """POST the buyer's order on its connection, with an Idempotency-Key, as the checkout page does: a 503 busy or
    429 again after Retry-After, a lost connection after a short backoff, with the same key; the answer whose
    status is `accepted`, or None (the connection closed) when refused or not answered within --give-up."""
    loop = asyncio.get_running_loop()
    body = json.dumps({**ORDER_BODY, "phone": buyer.phone}).encode()
    headers = {"Idempotency-Key": buyer.key}
    give_up = loop.time() + args.give_up
    failures = 0
    while True:
        if loop.time() > give_up:
            buyer.error = f"not served in {args.give_up:g} s"
            conn.close()
            return None
        answer, status, took = await post_order(conn, body, headers, args.order_timeout)
        buyer.answers.append((status, took))
        if answer is not None and status in accepted:
            return answer
        if answer is not None and status not in SHED:
            # A refusal after the order was saved (502: PayHero refused) names the order it kept:
            # it is this buyer's, not a duplicate.
            if "x-order-id" in answer.headers:
                buyer.order_ids.add(answer.headers["x-order-id"])
            buyer.error = f"{status} {answer.body[:120]!r}"
            conn.close()
            return None
        failures += 1
        await asyncio.sleep(answer.retry_after() if answer is not None else backoff(failures))


def callback_due_ms(order, delay):
    decoded = read_reference(order["payment"]["reference"])
    return None if decoded is None else decoded[2] + delay * 1000


def updated_ms(order_json):
    return datetime.fromisoformat(order_json["updated_at"].replace("Z", "+00:00")).timestamp() * 1000


def orders_in_database(database_url):
    """How many orders the server's database holds (a fresh one per run), or None without it."""
    if not database_url:
        return None
    from sqlalchemy import text

    engine = database_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT count(*) FROM orders")).scalar()
    finally:
        engine.dispose()


def unanswered_orders(result):
    count = result.get("orders_of_unanswered_buyers")
    return f" (and {count} made for buyers whose answer was lost and who gave up)" if count else ""


def orders_of_unanswered_buyers(database_url, buyers):
    """Orders made for buyers who were never answered them: a request whose answer was lost (timed out, its
    connection cut), and no retry with the same Idempotency-Key before the buyer gave up.  Not duplicates: the
    key makes at most one order a buyer.  None without the database."""
    if not database_url:
        return None
    from sqlalchemy import text

    engine = database_engine(database_url)
    try:
        with engine.connect() as connection:
            made = dict(connection.execute(text("SELECT key, order_id FROM idempotency_keys")).all())
    finally:
        engine.dispose()
    return sum(1 for b in buyers if b.key in made and made[b.key] not in b.order_ids)


OUTBOX_DRAIN_S = 120  # seconds the run waits, after the last journey, for the outbox to empty


def messages_once_sent(database_url, drain_seconds):
    """The tickets' messages of the run's paid orders (the outbox, issue 25), once none is pending or after
    `drain_seconds`: by channel and state; paid orders lacking a sent message on a channel the others have;
    messages claimed more than once (sent twice, or retried).  None without the database."""
    if not database_url:
        return None
    import time

    from sqlalchemy import text

    engine = database_engine(database_url)
    try:
        deadline = time.monotonic() + drain_seconds
        pending = last_progress = None
        with engine.connect() as connection:
            # Until none is pending, or none has left for 10 s (no sender runs: MESSAGES_SENDER=process).
            while time.monotonic() < deadline:
                now_pending = connection.execute(text("SELECT count(*) FROM outbox_messages WHERE state = 'pending'"))\
                    .scalar()
                connection.commit()
                if pending is None or now_pending < pending:
                    pending, last_progress = now_pending, time.monotonic()
                if not pending or time.monotonic() - last_progress > 10:
                    break
                time.sleep(0.5)
            rows = connection.execute(text("SELECT channel, state, count(*), sum(CASE WHEN attempts > 1 THEN 1 "
                                           "ELSE 0 END) FROM outbox_messages GROUP BY channel, state")).all()
            channels = {channel for channel, *_ in rows}
            missing = connection.execute(text(
                "SELECT count(*) FROM orders o WHERE o.status = 'completed' AND "
                "(SELECT count(*) FROM outbox_messages m WHERE m.order_id = o.id AND m.state = 'sent') "
                f"< {len(channels)}")).scalar()
    finally:
        engine.dispose()
    return {"by_channel_and_state": {f"{channel} {state}": count for channel, state, count, _ in rows},
            "orders_missing_a_message": missing,
            "claimed_more_than_once": sum(again or 0 for *_, again in rows)}


async def run(args, target):
    delay = callback_delay(args)
    buyers = [Buyer(i) for i in range(args.buyers)]
    started = asyncio.get_running_loop().time()
    deadline = started + args.buyers / args.rate + args.give_up + args.timeout + 30
    used, profile, messages = await run_journeys(args, target, journey, buyers, deadline)

    watches = [b.watch for b in buyers if b.watch]
    finished = [b for b in buyers if b.watch and b.watch.answered_at is not None]
    wrong = [b for b in finished if b.watch.status != b.expected]
    answers = [a for b in buyers for a in b.answers]
    shed = sum(b.shed() for b in buyers)
    served = [b for b in buyers if b.served_at is not None]
    answered_ids = {i for b in buyers for i in b.order_ids}
    in_database = orders_in_database(target.get("database_url"))
    unanswered = orders_of_unanswered_buyers(target.get("database_url"), buyers)
    duplicates = None if in_database is None else in_database - len(answered_ids) - unanswered
    last = max((b.watch.answered_at for b in finished), default=None)
    failures = []
    if wrong:
        failures.append(f"{len(wrong)} buyers saw a wrong outcome")
    if duplicates:
        failures.append(f"{duplicates} duplicate orders")
    return {
        "buyers": args.buyers,
        "arrival_rate": args.rate,
        "callback_delay_s": delay,
        "journeys": len(finished),
        "journeys_per_second": rounded(len(finished) / (last - started)) if last and last > started else None,
        "order_answers": len(answers),
        "order_answer_ms": spread(took for _, took in answers),
        "order_statuses": count_by(status for status, _ in answers),
        "shed": shed,
        "shed_share": rounded(shed / len(answers), 3) if answers else None,
        "served": len(served),
        "served_exactly_once": sum(1 for b in served if len(b.order_ids) == 1),
        "served_within_30s": sum(1 for b in served if b.served_at - b.arrived_at <= 30),
        "time_to_served_ms": spread((b.served_at - b.arrived_at) * 1000 for b in served),
        "not_served": len(buyers) - len(served),
        "orders_in_database": in_database,
        "duplicate_orders": duplicates,
        "orders_of_unanswered_buyers": unanswered,
        "outcome_after_callback_ms": spread(
            b.watch.answered_wall * 1000 - callback_due_ms(b.watch.order, delay) for b in finished
            if callback_due_ms(b.watch.order, delay) is not None),
        "outcome_after_commit_ms": spread(_after_commit(b) for b in finished),
        "order_retries": sum(len(b.answers) - 1 for b in served),
        "buyers_needing_a_retry": sum(1 for b in buyers if len(b.answers) > 1 or (b.watch and b.watch.retries)),
        **{f"wait_{k}": v for k, v in story(watches).items()},
        **journey_outcomes(buyers, finished, wrong, used, profile, messages, failures),
    }


def callback_delay(args):
    """The sandbox's SANDBOX_CALLBACK_DELAY for the run: --server-env's, else the mode's."""
    return float(dict(item.partition("=")[::2] for item in args.server_env).get("SANDBOX_CALLBACK_DELAY", CALLBACK_DELAY))


def switch_the_line_off(database_url):
    """[event.line] enabled = false for every event: past capacity, 503 busy and a retry (the modes without a line)."""
    if database_url is None:
        return
    from sqlalchemy import text

    engine = database_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE events SET line_enabled = false"))
    finally:
        engine.dispose()


async def run_journeys(args, target, journey, buyers, deadline):
    """journey(host, port, buyer, args, deadline) for each buyer, arriving at --rate, ended at `deadline` (the
    loop's time) at the latest; (the workers' usage meanwhile, the profile's top frames, the tickets' messages:
    with --deliver, what the stand-ins received under "delivered")."""
    loop = asyncio.get_running_loop()
    if not args.line:
        await loop.run_in_executor(None, switch_the_line_off, target.get("database_url"))
    profiler = Profiler(args.profile, target, args.profile_rate)
    usage = Usage(target).start()
    tasks = await paced(args.rate, [journey(target["host"], target["port"], b, args, deadline) for b in buyers])
    await asyncio.wait(tasks, timeout=max(5, deadline - loop.time()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # The tickets' messages leave after their payments (later still while the workers are busy): their CPU
    # belongs to the journeys, so the workers are measured until the outbox is empty.
    messages = await loop.run_in_executor(None, messages_once_sent, target.get("database_url"), OUTBOX_DRAIN_S)
    used, profile = usage.stop(), profiler.stop()
    if messages is not None and target.get("delivery"):  # read after the measured part: not the journeys' CPU
        messages["delivered"] = await loop.run_in_executor(None, target["delivery"].report, target["database_url"])
    return used, profile, messages


def journey_outcomes(buyers, finished, wrong, used, profile, messages, failures):
    """The part of a run's results every journey mode reports: outcomes, errors, the tickets' messages (a message
    missing or claimed twice is added to `failures`), worker CPU per journey, usage."""
    if messages and (messages["orders_missing_a_message"] or messages["claimed_more_than_once"]):
        failures.append(f"messages: {messages['orders_missing_a_message']} paid orders without each of theirs sent, "
                        f"{messages['claimed_more_than_once']} messages claimed more than once")
    if messages and messages.get("delivered"):
        failures += delivery.failures(messages["delivered"])
    cpu = worker_cpu_total(used)
    return {
        "outcomes": count_by(b.watch.status for b in finished),
        "wrong_outcomes": len(wrong),
        "buyer_errors": sum(1 for b in buyers if b.error),
        "first_buyer_errors": [b.error for b in buyers if b.error][:5],
        "messages": messages,
        "worker_cpu_ms_per_journey": rounded(cpu * 1000 / len(finished)) if cpu is not None and finished else None,
        **used,
        "profile_top": profile,
        "failures": failures,
    }


def _after_commit(buyer):
    """Page answered - the final change's commit (its updated_at), from the answer the page got."""
    return buyer.watch.answered_wall * 1000 - updated_ms(buyer.watch.final)


def summary(result):
    return (f"{result['buyers']} buyers at {result['arrival_rate']:g}/s: {result['journeys_per_second']} journeys/s, "
            f"{latency('order answer', result['order_answer_ms'])}, "
            f"{latency('outcome after callback', result['outcome_after_callback_ms'])}; "
            f"shed {result['shed']} ({result['shed_share']}), served {result['served']} "
            f"(exactly once {result['served_exactly_once']}), "
            f"{latency('time to be served', result['time_to_served_ms'])}; "
            f"wrong outcomes {result['wrong_outcomes']}, duplicate orders {result['duplicate_orders']}"
            f"{unanswered_orders(result)}, buyers needing a retry {result['buyers_needing_a_retry']}, errors {result['buyer_errors']}; "
            f"messages {result['messages'] and result['messages']['by_channel_and_state']}"
            f"{delivery.summary(result['messages'] and result['messages'].get('delivered'))}; "
            f"worker CPU {result['worker_cpu_percent']} % ({result['worker_cpu_ms_per_journey']} ms/journey)"
            f"{stand_ins_cpu(result)}")


def stand_ins_cpu(result):
    """A clause for a summary line: the delivery stand-ins' CPU ('' without --deliver)."""
    return "" if result.get("stand_ins_cpu_s") is None else f", stand-ins CPU {result['stand_ins_cpu_s']} s"
