"""drop: a ticket drop: --buyers buyers, --concurrency at a time, each POSTing one order on its own connection.

The ticket type has --tickets left (default: enough for all).  Then the
database is read: were tickets oversold, and does any buyer not answered 201
hold tickets?
"""
import asyncio
import json

from .client import NO_CALLBACK_PHONE, ORDER_BODY, Conn, post_order
from .results import count_by, latency, rounded, spread
from .server import Profiler, Usage, database_engine, worker_cpu_total

SERVER = {"WEB_CONCURRENCY": "2"}


def add_arguments(parser):
    parser.add_argument("-n", "--buyers", type=int, default=6000, help="buyers in all (default 6000)")
    parser.add_argument("--concurrency", type=int, default=300, help="buyers at a time (default 300)")
    parser.add_argument("--ticket-type", default="early-bird", help="the demo event's ticket type everyone buys")
    parser.add_argument("--quantity", type=int, default=1, help="tickets per order")
    parser.add_argument("--tickets", type=int, help="tickets on sale (default: quantity x buyers)")
    parser.add_argument("--phone", default=NO_CALLBACK_PHONE, help="the buyers' phone (default: never called back)")
    parser.add_argument("--order-timeout", type=float, default=60, help="seconds a buyer waits for the answer")


def set_tickets(database_url, ticket_type, tickets):
    """Give the ticket type `tickets` free tickets before the drop."""
    from sqlalchemy import text

    engine = database_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "UPDATE ticket_types SET capacity = :tickets, reserved = 0 WHERE code = :code "
                "AND event_id = (SELECT id FROM events WHERE slug = :slug)"),
                {"tickets": tickets, "code": ticket_type, "slug": ORDER_BODY["event"]})
    finally:
        engine.dispose()


def ledger(database_url, ticket_type, sold_ids):
    """What the database says after the drop: capacity, reserved, and tickets held by buyers not told 201."""
    from sqlalchemy import text

    engine = database_engine(database_url)
    try:
        with engine.connect() as connection:
            type_id, capacity, reserved = connection.execute(text(
                "SELECT t.id, t.capacity, t.reserved FROM ticket_types t JOIN events e ON e.id = t.event_id "
                "WHERE e.slug = :slug AND t.code = :code"), {"slug": ORDER_BODY["event"], "code": ticket_type}).one()
            orders = connection.execute(text("SELECT id, status, quantity FROM orders WHERE ticket_type_id = :id"),
                                        {"id": type_id}).all()
    finally:
        engine.dispose()
    holding = [(order_id, quantity) for order_id, status, quantity in orders if status in ("pending", "completed")]
    return {
        "capacity": capacity,
        "reserved": reserved,
        "oversold": max(reserved - capacity, 0),
        "held_by_orders": sum(quantity for _, quantity in holding),
        "held_without_201": sum(quantity for order_id, quantity in holding if order_id not in sold_ids),
    }


async def run(args, target):
    database_url = target.get("database_url")
    tickets = args.tickets if args.tickets is not None else args.buyers * args.quantity
    if database_url:
        set_tickets(database_url, args.ticket_type, tickets)
    body = json.dumps({**ORDER_BODY, "ticket_type": args.ticket_type, "quantity": args.quantity,
                       "phone": args.phone}).encode()
    answers = []
    left = [args.buyers]

    async def buyer():
        while left[0] > 0:
            left[0] -= 1
            conn = Conn(target["host"], target["port"])
            answers.append(await post_order(conn, body, timeout=args.order_timeout))
            conn.close()

    profiler = Profiler(args.profile, target, args.profile_rate)
    usage = Usage(target).start()
    await asyncio.gather(*(buyer() for _ in range(args.concurrency)))
    used = usage.stop()
    statuses = count_by(status for _, status, _ in answers)
    sold_ids = {answer.json()["id"] for answer, status, _ in answers if status == 201}
    errors = [f"{status} {answer.body[:200] if answer else b''!r}" for answer, status, _ in answers
              if status not in (201, 409)]
    cpu = worker_cpu_total(used)
    result = {
        "buyers": args.buyers,
        "concurrency": args.concurrency,
        "tickets": tickets,
        "quantity": args.quantity,
        "orders_per_second": rounded(len(sold_ids) / used["wall_s"]),
        "answers_per_second": rounded(len(answers) / used["wall_s"]),
        "answer_ms": spread(took for _, _, took in answers),
        "statuses": statuses,
        "errors": len(errors),
        "first_errors": errors[:5],
        "worker_cpu_ms_per_order": rounded(cpu * 1000 / len(answers)) if cpu is not None else None,
        **used,
        "profile_top": profiler.stop(),
        "failures": [],
    }
    if database_url:
        result["ledger"] = {**ledger(database_url, args.ticket_type, sold_ids), "sold_201": len(sold_ids) * args.quantity}
        if result["ledger"]["oversold"] or result["ledger"]["held_without_201"]:
            result["failures"].append(f"ledger: {result['ledger']}")
    return result


def summary(result):
    return (f"{result['buyers']} buyers, {result['concurrency']} at a time: {result['orders_per_second']} orders/s, "
            f"{latency('answer', result['answer_ms'])}, statuses {result['statuses']}, "
            f"ledger {result.get('ledger')}; worker CPU {result['worker_cpu_percent']} %")
