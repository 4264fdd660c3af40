"""callbacks: webhook throughput: N orders, then a success callback for each at --rate (0: back to back).

No waits are held; the answer time of the callback itself, the worker's CPU
and database queries per callback.
"""
from . import held
from .client import NO_CALLBACK_PHONE, Pool, create_orders
from .page import Watch
from .payhero import pay
from .results import latency, rounded, spread
from .server import Profiler, Usage, scrape, worker_cpu_total

SERVER = held.SERVER


def add_arguments(parser):
    parser.add_argument("-n", type=int, default=6000, help="orders, one callback each (default 6000)")
    parser.add_argument("--rate", type=float, default=300, help="callbacks per second, 0: back to back (default 300)")
    parser.add_argument("--create-concurrency", type=int, default=16, help="orders created at once before the run")
    parser.add_argument("--callback-connections", type=int, default=128, help="keep-alive connections for callbacks")


async def run(args, target):
    api = Pool(target["host"], target["port"], args.create_concurrency)
    callbacks = Pool(target["host"], target["port"], args.callback_connections)
    orders, create_rate = await create_orders(api, args.n, args.create_concurrency, NO_CALLBACK_PHONE)
    watches = [Watch(order) for order in orders]
    profiler = Profiler(args.profile, target, args.profile_rate)
    usage = Usage(target).start()
    m0 = await scrape(api)
    paid = await pay(callbacks, watches, args.rate, args.token)
    m1 = await scrape(api)
    used = usage.stop()
    api.close()
    callbacks.close()
    cpu = worker_cpu_total(used)
    n = len(watches)
    return {
        "orders": n,
        "orders_created_per_second": round(create_rate, 1),
        "offered_rate": args.rate or "max",
        **paid,
        "callback_response_ms": spread(w.callback_ms for w in watches),
        "db_queries_per_callback": round((m1.get("eventi_db_queries_total", 0)
                                          - m0.get("eventi_db_queries_total", 0)) / n, 3),
        "worker_cpu_ms_per_callback": rounded(cpu * 1000 / n) if cpu is not None else None,
        **used,
        "profile_top": profiler.stop(),
        "failures": [f"{paid['callback_errors']} callbacks not applied"] if paid["callback_errors"] else [],
    }


def summary(result):
    return (f"{result['callbacks']} callbacks offered at {result['offered_rate']}/s: {result['callbacks_per_second']}/s, "
            f"{latency('answer', result['callback_response_ms'])}; {result['db_queries_per_callback']} queries and "
            f"{result['worker_cpu_ms_per_callback']} ms worker CPU per callback; errors {result['callback_errors']}")
