"""held: N orders, one held wait each on its own connection, then a success callback for each at --rate.

Latency is callback sent -> wait answered, both stamped here: what the
customer waits for, the callback's own processing included.  --short-poll
instead GETs the order every --poll-interval seconds (the page before long
polling), for contrast.  The storm and cluster modes are this run with other
defaults.
"""
import asyncio
import json
import random

from .client import NO_CALLBACK_PHONE, Pool, create_orders, paced
from .page import Watch, follow, story
from .payhero import pay
from .results import latency, rounded, spread
from .server import (Profiler, Usage, gc_pauses, histogram_quantile, open_fds, redis_connections, rss_mb, scrape,
                     worker_cpu_total)

# Its orders are the run's setup, made as fast as the server takes them: not a crowd for the line to hold.
SERVER = {"WEB_CONCURRENCY": "1", "LINE_START_RATE": "100000"}
DISCONNECTS = 'eventi_redis_transitions_total{state="disconnected"}'


def add_arguments(parser, n=1000, rate=200, open_rate=500, open_concurrency=200):
    parser.add_argument("-n", type=int, default=n, help=f"orders, one held wait each (default {n})")
    parser.add_argument("--rate", type=float, default=rate, help=f"callbacks per second, 0: back to back (default {rate:g})")
    parser.add_argument("--open-rate", type=float, default=open_rate, help=f"waits opened per second (default {open_rate:g})")
    parser.add_argument("--open-concurrency", type=int, default=open_concurrency, help="connections being opened at once")
    parser.add_argument("--timeout", type=float, default=55, help="the wait's timeout= (the hold), seconds")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between all waits held and the first callback")
    parser.add_argument("--create-concurrency", type=int, default=16, help="orders created at once before the run")
    parser.add_argument("--callback-connections", type=int, default=128, help="keep-alive connections for callbacks")
    parser.add_argument("--short-poll", action="store_true", help="short polling (GET the order) instead of held waits")
    parser.add_argument("--poll-interval", type=float, default=3.0, help="--short-poll: seconds between GETs")


async def short_poll(host, port, watch, interval, deadline, opening):
    """The old status page: GET the order every `interval` seconds on a keep-alive connection."""
    from .client import Conn, HttpError

    conn, loop = Conn(host, port), asyncio.get_running_loop()
    try:
        async with opening:
            await conn.open()
        await asyncio.sleep(random.uniform(0, interval))  # page loads are spread out
        while loop.time() < deadline:
            tick = loop.time()
            watch.requests += 1
            answer = await conn.request("GET", f"/api/orders/{watch.order['id']}")
            if answer.status != 200:
                watch.refusals.append(answer.status)
                watch.error = f"{answer.status} {answer.body[:120]!r}"
                return
            status = json.loads(answer.body)["status"]
            if status != "pending":
                watch.answered_at, watch.status = loop.time(), status
                return
            await asyncio.sleep(max(0, tick + interval - loop.time()))
        watch.error = "still pending at the end of the run"
    except (OSError, HttpError, ValueError) as exc:
        watch.error = repr(exc)
    finally:
        conn.close()


async def until_held(pool, watches, limit):
    """Until the server holds a wait for every page not yet answered or refused (or `limit` s); the held count."""
    loop = asyncio.get_running_loop()
    deadline, held = loop.time() + limit, 0
    while loop.time() < deadline:
        held = int((await scrape(pool)).get("eventi_waiters", 0))
        if held + sum(1 for w in watches if w.error or w.answered_at) >= len(watches):
            break
        await asyncio.sleep(0.25)
    return held


async def run(args, target, retry_refused=False):
    """Create, hold, pay, measure.  retry_refused: pages retry a refused wait (else it counts and stops)."""
    host, port, loop = target["host"], target["port"], asyncio.get_running_loop()
    api = Pool(host, port, args.create_concurrency)
    callbacks = Pool(host, port, args.callback_connections)
    orders, create_rate = await create_orders(api, args.n, args.create_concurrency, NO_CALLBACK_PHONE)
    watches = [Watch(order) for order in orders]
    profiler = Profiler(args.profile, target, args.profile_rate)
    usage = Usage(target).start()
    m0 = await scrape(api)
    opening = asyncio.Semaphore(args.open_concurrency)
    started = loop.time()
    deadline = started + args.timeout + (args.n / args.rate if args.rate else 60) + 60
    if args.short_poll:
        pages = [short_poll(host, port, w, args.poll_interval, deadline, opening) for w in watches]
    else:
        pages = [follow(host, port, w, args.timeout, deadline, retry_refused, opening) for w in watches]
    tasks = await paced(args.open_rate, pages)
    opened_in = loop.time() - started
    held = None if args.short_poll else await until_held(api, watches, 120)
    hold_seconds = loop.time() - started
    m1 = await scrape(api)
    holding = {"redis_connections": redis_connections(target["redis_url"], target.worker_pid),
               "worker_rss_mb_holding": rounded(rss_mb(target.worker_pid)),
               "worker_open_files_holding": open_fds(target.worker_pid)}
    await asyncio.sleep(args.settle)
    paid = await pay(callbacks, [w for w in watches if not w.error and w.answered_at is None], args.rate, args.token)
    await asyncio.wait(tasks, timeout=max(5, deadline - loop.time()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    m2 = await scrape(api)
    used = usage.stop()
    api.close()
    callbacks.close()

    n = len(watches)
    paid_watches = [w for w in watches if w.callback_sent_at is not None]
    wrong = [w for w in paid_watches if w.answered_at is not None and w.status != "completed"]
    queries = m2.get("eventi_db_queries_total", 0) - m0.get("eventi_db_queries_total", 0)
    cpu = worker_cpu_total(used)
    return {
        "orders": n,
        "orders_created_per_second": round(create_rate, 1),
        "waits_opened_in_s": rounded(opened_in),
        "waiters_held": held,
        "seconds_to_hold_all": rounded(hold_seconds),
        **story(watches),
        **paid,
        "notified": sum(1 for w in paid_watches if w.status == "completed"),
        "wrong_status": len(wrong),
        "latency_ms": spread(w.ms_since_callback() for w in paid_watches),
        "callback_response_ms": spread(w.callback_ms for w in paid_watches),
        # Server side, publish after the commit -> wait answered, to the histogram's bucket bound.
        "server_delivery_ms_le": {f"p{q}": histogram_quantile(m0, m2, "eventi_delivery_latency_seconds", q)
                                  for q in (50, 99)},
        # A subscriber that loses Redis (or cannot wait on its socket) leaves the waits to the database's
        # re-check every 2 s: the storm's slowness in issue 24.
        "subscriber_disconnects": int(m2.get(DISCONNECTS, 0) - m0.get(DISCONNECTS, 0)),
        "db_queries_per_payment": round(queries / n, 3) if n else None,
        "db_queries_while_opening": int(m1.get("eventi_db_queries_total", 0) - m0.get("eventi_db_queries_total", 0)),
        "worker_cpu_ms_per_payment": rounded(cpu * 1000 / n) if cpu is not None and n else None,
        **holding,
        **gc_pauses(m0, m2),
        **used,
        "profile_top": profiler.stop(),
        "failures": [f"{len(wrong)} waits answered a wrong status"] if wrong else [],
    }


def summary(result):
    refused = f", refused {result['refused']}" + (f" {result['refusals_by_status']}" if result["refused"] else "")
    held = "short polling" if result["waiters_held"] is None else f"held {result['waiters_held']} (server's gauge)"
    return (f"{result['orders']} pages opened in {result['waits_opened_in_s']} s, {held}"
            f"{refused}; {result['notified']} notified at {result['callbacks_per_second']}/s, "
            f"{latency('callback->answer', result['latency_ms'])}; worker CPU {result['worker_cpu_percent']} %; "
            f"subscriber disconnects {result['subscriber_disconnects']}; "
            f"errors {result['errors']}, wrong {result['wrong_status']}"
            + (f"; first error {result['first_errors'][0]}" if result["first_errors"] else ""))
