"""line: sales open past capacity, and the event's line holds the buyers (6,000 arriving at 600/s by default).

Each buyer, on its own connection: POST /api/orders with an Idempotency-Key (a 503 busy or 429, the line
being off, retried as the journeys do).  201: served at once.  202: a place in the line; hold
GET /api/queue/<id>/wait?since=<version> as the checkout page does (each hold at most --patience/2 s, asked
again at once: the server paces its answers) until the place is admitted (then the order is followed as the status page does, to its outcome),
sold_out, refused or left.  --leave-share: that share of the queued buyers stop asking once they have a
place (their page closed); the line must skip them after LINE_PATIENCE.  The phones decide the outcomes
as in the journeys (85% pay).

What it reports (wall clock of this one machine):
- every POST's answer time and status (5xx must be none);
- fairness: the most any buyer was admitted after one who came later, over every pair, seconds (came =
  its first POST sent, a retry after 503 busy included; admitted = its order's created_at, the server's
  moment); the server's own join falls between the POST's sending and its answer, so the same measure
  with joined = the POST answered is given beside it (fairness_by_answer_s), with the worst pair;
- served once: the orders each buyer was answered (exactly one), orders in the database against them
  (orders the line made for buyers who stopped asking are found through GET /api/queue/<id>), and
  tickets held against tickets paid (the database);
- goodput: journeys with an outcome / (last outcome - first arrival); when the last buyer was admitted;
- estimate honesty: the share of admitted queued buyers whose estimate at joining was within
  max(10 s, 20%) of their real wait, and the largest rise of the estimate a buyer was shown between two
  answers (as a share of the one before, counted where that was at least 10 s);
- worker CPU per journey, as the other modes.
"""
import asyncio
import random
import time
from datetime import datetime

from . import delivery, journeys
from .client import ORDER_BODY, Conn, HttpError, Pool
from .journeys import (Buyer, callback_delay, journey_outcomes, orders_in_database, post_until_answered,
                       run_journeys, updated_ms)
from .page import Watch, ask, follow, reconnect_after
from .results import count_by, latency, rounded, spread
from .server import database_engine

SERVER = journeys.SERVER
LINE_PATIENCE = 60  # the server's default (API.md: LINE_PATIENCE)
# An estimate is honest within max(10 s, 20%) of the real wait; a rise is measured from estimates of 10 s or more.
HONEST_WITHIN_S, HONEST_WITHIN_SHARE = 10.0, 0.2
RISE_FROM_S = 10


def add_arguments(parser):
    journeys.add_arguments(parser, rate=600, buyers=6000, line=True)
    parser.add_argument("--leave-share", type=float, default=0.0,
                        help="share of the queued buyers who stop asking once they have a place (default 0)")
    parser.add_argument("--learned-rate", type=float, default=None,
                        help="the serving rate a previous line left (line:rate, as --json's learned_rate gives it), "
                             "written to the server's Redis before the run: a second sale on the same service")
    parser.add_argument("--patience", type=float, default=LINE_PATIENCE,
                        help=f"the server's LINE_PATIENCE, seconds: a waiter asks at least every half of it "
                             f"(default {LINE_PATIENCE})")


class LineBuyer(Buyer):
    __slots__ = ("leaves", "came_at", "joined_at", "place", "estimates", "place_status", "admitted_at", "place_refusals")

    def __init__(self, index, leaves):
        super().__init__(index)
        self.leaves = leaves
        self.came_at = self.joined_at = self.place = self.place_status = self.admitted_at = None
        self.estimates = []  # estimated_wait_s of every answer about the place while queued, the 202's first
        self.place_refusals = []


def queue_wait_path(place_id, version, timeout):
    return f"/api/queue/{place_id}/wait?timeout={timeout:g}&since={version}"


def created_wall(order):
    return datetime.fromisoformat(order["created_at"].replace("Z", "+00:00")).timestamp()


async def journey(host, port, buyer, args, deadline):
    loop = asyncio.get_running_loop()
    conn = Conn(host, port)
    buyer.arrived_at, buyer.came_at = loop.time(), time.time()
    answer = await post_until_answered(conn, buyer, args, accepted=(200, 201, 202))
    if answer is None:
        return
    buyer.joined_at = time.time()
    if answer.status == 202:
        buyer.place = answer.json()["queue"]
        buyer.estimates.append(buyer.place["estimated_wait_s"])
        if buyer.leaves:
            buyer.place_status = "stopped asking"
            conn.close()
            return
        outcome = await hold_place(conn, buyer, args, deadline)
        if outcome is None or outcome["status"] != "admitted":
            conn.close()
            return
        order = outcome["order"]
    else:
        order = answer.json()
    buyer.served_at = loop.time()
    buyer.admitted_at = created_wall(order)
    buyer.order_ids.add(order["id"])
    buyer.watch = Watch(order)
    await follow(host, port, buyer.watch, args.timeout, deadline, retry_refused=True, conn=conn)


async def hold_place(conn, buyer, args, deadline):
    """Hold the place's wait until it is no longer queued: its last answer, or None at the run's end."""
    loop = asyncio.get_running_loop()
    hold = min(args.timeout, args.patience / 2)
    version, failures = buyer.place["version"], 0
    while loop.time() < deadline:
        answer, refusal = await ask(conn, queue_wait_path(buyer.place["id"], version, hold))
        if refusal is not None:
            buyer.place_refusals.append(refusal)
            failures += 1
            await reconnect_after(conn, answer, failures)
            continue
        failures = 0
        place = answer.json()
        if place["status"] != "queued":
            buyer.place_status = place["status"]
            return place
        version = place["version"]
        buyer.estimates.append(place["estimated_wait_s"])
    buyer.error = "still in line at the end of the run"
    return None


def fairness(buyers, joined=lambda buyer: buyer.came_at):
    """The most any buyer was admitted after one who joined later: the max over pairs (a joined before b) of
    admitted(a) - admitted(b), in seconds (0 when every buyer was admitted in the order they joined), and that
    pair (a, b), or None.  Joined: when the buyer first sent its POST (default), or another moment of theirs."""
    served = sorted((b for b in buyers if b.admitted_at is not None), key=joined)
    worst, pair, first_of_the_later = 0.0, None, None
    for buyer in reversed(served):
        if first_of_the_later is not None and buyer.admitted_at - first_of_the_later.admitted_at > worst:
            worst, pair = buyer.admitted_at - first_of_the_later.admitted_at, (buyer, first_of_the_later)
        if first_of_the_later is None or buyer.admitted_at < first_of_the_later.admitted_at:
            first_of_the_later = buyer
    return worst, pair


async def watch_the_line(host, port, shown):
    """What the event's page says of its line, (serving_rate, length) once a second, appended to `shown`."""
    conn = Conn(host, port)
    try:
        while True:
            try:
                answer = await conn.request("GET", f"/api/events/{ORDER_BODY['event']}")
                line = answer.json().get("line") or {}
                shown.append((line.get("serving_rate"), line.get("length")))
            except (OSError, HttpError, ValueError):
                shown.append(None)
                conn.close()
                conn = Conn(host, port)
            await asyncio.sleep(1)
    finally:
        conn.close()


def per_second(offsets_s):
    """[how many of these moments fell in second 0, 1, ...]."""
    counts = {}
    for offset in offsets_s:
        counts[int(offset)] = counts.get(int(offset), 0) + 1
    return [counts.get(second, 0) for second in range(max(counts, default=-1) + 1)]


def story_of(buyer, started_wall):
    """A buyer's place for a report: when it joined and was admitted (seconds into the run), its first answer."""
    return {"buyer": buyer.index, "came_s": rounded(buyer.came_at - started_wall, 3),
            "joined_s": rounded(buyer.joined_at - started_wall, 3),
            "admitted_s": rounded(buyer.admitted_at - started_wall, 3),
            "place_at_join": {k: buyer.place[k] for k in ("position", "ahead", "estimated_wait_s")} if buyer.place else None}


def honest(buyer):
    real = buyer.admitted_at - buyer.joined_at
    return abs(buyer.estimates[0] - real) <= max(HONEST_WITHIN_S, HONEST_WITHIN_SHARE * real)


def largest_rise_pct(estimates):
    rises = [(after - before) / before * 100 for before, after in zip(estimates, estimates[1:]) if before >= RISE_FROM_S]
    return max(rises, default=0.0)


async def orders_of_leavers(host, port, buyers):
    """The orders the line made for buyers who stopped asking (admitted before it knew they had left), by asking
    for each place once: {order id}."""
    pool = Pool(host, port, 20)
    found = set()

    async def ask(buyer):
        try:
            answer = await pool.request("GET", f"/api/queue/{buyer.place['id']}")
        except (OSError, HttpError):
            return
        if answer.status == 200 and (answer.json().get("order") or {}).get("id"):
            found.add(answer.json()["order"]["id"])

    leavers = [b for b in buyers if b.place_status == "stopped asking"]
    for start in range(0, len(leavers), 100):
        await asyncio.gather(*(ask(b) for b in leavers[start:start + 100]))
    pool.close()
    return found


def tickets_held_and_paid(database_url):
    """(tickets held, tickets paid, tickets of orders still pending) in the server's database, or Nones."""
    if not database_url:
        return None, None, None
    from sqlalchemy import text

    engine = database_engine(database_url)
    try:
        with engine.connect() as connection:
            held = connection.execute(text("SELECT coalesce(sum(reserved), 0) FROM ticket_types")).scalar()
            by_status = dict(connection.execute(text(
                "SELECT status, coalesce(sum(quantity), 0) FROM orders GROUP BY status")).all())
    finally:
        engine.dispose()
    return held, by_status.get("completed", 0), by_status.get("pending", 0)


def learned_rate(target, set_to=None):
    """The serving rate this run's line left for the next one to start from (line:rate), or None; with
    `set_to`, that rate is written first (as a previous line would have left it)."""
    if not target.get("redis_url"):
        return None
    import redis

    client = redis.Redis.from_url(target["redis_url"])
    key = f"{target.get('redis_prefix', '')}line:rate"
    try:
        if set_to is not None:
            client.set(key, repr(set_to))
        value = client.get(key)
    finally:
        client.close()
    return rounded(float(value)) if value is not None else None


async def run(args, target):
    host, port, loop = target["host"], target["port"], asyncio.get_running_loop()
    if args.learned_rate is not None:
        learned_rate(target, set_to=args.learned_rate)
    chooser = random.Random(args.buyers)
    buyers = [LineBuyer(i, chooser.random() < args.leave_share) for i in range(args.buyers)]
    started, started_wall = loop.time(), time.time()
    deadline = started + args.buyers / args.rate + args.give_up + args.timeout + 2 * args.patience + 30
    shown = []
    watcher = asyncio.ensure_future(watch_the_line(host, port, shown))
    used, profile, messages = await run_journeys(args, target, journey, buyers, deadline)
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)

    answers = [a for b in buyers for a in b.answers]
    queued = [b for b in buyers if b.place is not None]
    admitted = [b for b in buyers if b.admitted_at is not None]
    queued_admitted = [b for b in queued if b.admitted_at is not None and b.estimates]
    finished = [b for b in buyers if b.watch and b.watch.answered_at is not None]
    wrong = [b for b in finished if b.watch.status != b.expected]
    last = max((b.watch.answered_at for b in finished), default=None)
    answered_ids = {i for b in buyers for i in b.order_ids}
    leavers_orders = await orders_of_leavers(host, port, buyers)
    in_database = orders_in_database(target.get("database_url"))
    duplicates = None if in_database is None else in_database - len(answered_ids | leavers_orders)
    held, paid, pending = tickets_held_and_paid(target.get("database_url"))
    fives = sum(1 for status, _ in answers if isinstance(status, int) and status >= 500)
    rises = [largest_rise_pct(b.estimates) for b in queued]
    unfairness, pair = fairness(buyers)
    unfairness_by_answer, pair_by_answer = fairness(buyers, lambda buyer: buyer.joined_at)

    failures = []
    if wrong:
        failures.append(f"{len(wrong)} buyers saw a wrong outcome")
    if duplicates:
        failures.append(f"{duplicates} duplicate orders")
    if any(len(b.order_ids) > 1 for b in buyers):
        failures.append("a buyer was answered more than one order")
    if held is not None and held != paid + pending:
        failures.append(f"tickets held {held} != paid {paid} + pending {pending}")
    return {
        "buyers": args.buyers,
        "arrival_rate": args.rate,
        "leave_share": args.leave_share,
        "callback_delay_s": callback_delay(args),
        "order_answers": len(answers),
        "order_answer_ms": spread(took for _, took in answers),
        "order_statuses": count_by(status for status, _ in answers),
        "order_answers_5xx": fives,
        "queued": len(queued),
        "place_outcomes": count_by(b.place_status for b in queued),
        "place_refusals": count_by(r for b in queued for r in b.place_refusals),
        "admitted": len(admitted),
        "fairness_s": rounded(unfairness, 3),
        "fairness_worst_pair": [story_of(b, started_wall) for b in pair] if pair else None,
        "fairness_by_answer_s": rounded(unfairness_by_answer, 3),
        "fairness_by_answer_worst_pair": [story_of(b, started_wall) for b in pair_by_answer] if pair_by_answer else None,
        "served_exactly_once": sum(1 for b in admitted if len(b.order_ids) == 1),
        "orders_in_database": in_database,
        "orders_made_for_buyers_who_left": len(leavers_orders),
        "duplicate_orders": duplicates,
        "tickets_held": held,
        "tickets_paid": paid,
        "tickets_pending": pending,
        "journeys": len(finished),
        "journeys_per_second": rounded(len(finished) / (last - started)) if last and last > started else None,
        # the outflow as the buyers saw it: how many were admitted in each second of the run; beside it the
        # serving rate and the length the event's page showed (GET /api/events/<slug>), once a second
        "admitted_by_second": per_second((b.admitted_at - started_wall for b in admitted)),
        "line_shown_by_second": shown,
        "last_admitted_after_s": rounded(max((b.admitted_at for b in admitted), default=started_wall) - started_wall),
        "time_to_admitted_ms": spread((b.admitted_at - b.joined_at) * 1000 for b in admitted),
        # what the next line starts its estimates from (pass it as LINE_START_RATE to measure a second sale)
        "learned_rate": learned_rate(target),
        "estimate_honest_share": rounded(sum(1 for b in queued_admitted if honest(b)) / len(queued_admitted), 3)
        if queued_admitted else None,
        "estimate_largest_rise_pct": rounded(max(rises, default=0.0), 1),
        "estimate_rises_over_20pct": sum(1 for rise in rises if rise > 20),
        "outcome_after_commit_ms": spread(b.watch.answered_wall * 1000 - updated_ms(b.watch.final) for b in finished),
        **journey_outcomes(buyers, finished, wrong, used, profile, messages, failures),
    }


def summary(result):
    return (f"{result['buyers']} buyers at {result['arrival_rate']:g}/s (leaving {result['leave_share']:g}): "
            f"{latency('POST answer', result['order_answer_ms'])}, statuses {result['order_statuses']}; "
            f"queued {result['queued']} {result['place_outcomes']}; fairness {result['fairness_s']} s; "
            f"served exactly once {result['served_exactly_once']}/{result['admitted']}, "
            f"duplicate orders {result['duplicate_orders']}, tickets held {result['tickets_held']} "
            f"paid {result['tickets_paid']}; goodput {result['journeys_per_second']} journeys/s, "
            f"last admitted at {result['last_admitted_after_s']} s; estimates honest {result['estimate_honest_share']}, "
            f"largest rise {result['estimate_largest_rise_pct']} %; learned rate {result['learned_rate']}; "
            f"worker CPU {result['worker_cpu_ms_per_journey']} ms/journey{journeys.stand_ins_cpu(result)}; "
            f"errors {result['buyer_errors']}"
            f"{delivery.summary(result['messages'] and result['messages'].get('delivered'))}")
