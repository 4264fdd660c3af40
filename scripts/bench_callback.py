"""CPU and wall time of one PayHero callback, in-process, on PostgreSQL and Redis.

No HTTP server and no load generator: the Flask test client posts N success
callbacks one after another, so the figure is the webhook's own cost (Flask,
the service, SQLAlchemy, psycopg, the Redis publish) with nothing else on the
worker. Use it to compare commits: the median of --repeat rounds is printed.

    .venv/bin/python scripts/bench_callback.py [-n 1000] [--repeat 5]
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import psycopg  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ADMIN_URL = "postgresql://postgres@127.0.0.1/postgres"


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def scratch_app(prefix, redis_url, sandbox_port=False):
    """The app on a fresh PostgreSQL database (dropped afterwards) with the demo event, and Redis.

    Yields the app; with sandbox_port, (app, port): PUBLIC_BASE_URL points at that free port, for
    a server in this process to answer the sandbox PayHero on.
    """
    from config import Config
    from eventi_flask import create_app
    from eventi_flask.events.commands import seed_demo
    from eventi_flask.extensions import db
    from tests.support import free_port

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    port = free_port()
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        app = create_app(Config({
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1/{name}", "REDIS_URL": redis_url,
            "REDIS_PREFIX": f"{name}:", "LOG_LEVEL": "WARNING", "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
            "ORDER_LIMIT_PER_PHONE": "off", "ORDER_LIMIT_PER_CLIENT": "off",
        }))
        with app.app_context():
            db.create_all()
            seed_demo()
        yield (app, port) if sandbox_port else app
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run_rounds(do_round, repeat, n, what, profiler=None):
    """Run `do_round(r)` (n requests) `repeat` times; print CPU and wall per request for each, and the medians.

    With a cProfile `profiler`, the last round runs under it.
    """
    rounds = []
    for r in range(repeat):
        if profiler is not None and r == repeat - 1:
            profiler.enable()
        cpu, wall = cpu_seconds(), time.perf_counter()
        do_round(r)
        rounds.append(((cpu_seconds() - cpu) * 1000 / n, (time.perf_counter() - wall) * 1000 / n))
        if profiler is not None:
            profiler.disable()
        print(f"round {r + 1}: {rounds[-1][0]:.2f} ms CPU, {rounds[-1][1]:.2f} ms wall per {what}")
    print(f"median of {repeat} x {n}: {statistics.median(c for c, _ in rounds):.2f} ms CPU, "
          f"{statistics.median(w for _, w in rounds):.2f} ms wall per {what}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="callbacks per round")
    parser.add_argument("--repeat", type=int, default=5, help="rounds")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    from eventi_flask.events.models import TicketType
    from eventi_flask.extensions import db
    from eventi_flask.orders.models import Order
    from eventi_flask.payhero.sandbox import classic_callback

    with scratch_app("bench_callback", args.redis_url) as app:
        with app.app_context():
            ticket_type = db.session.query(TicketType).first()
            orders = [Order(ticket_type_id=ticket_type.id, quantity=2, amount=ticket_type.price * 2, name="Bench",
                            email="bench@example.com", phone="254712345678", version=1,
                            payhero_reference=f"REF{i}", checkout_request_id=f"ws_CO_{i}")
                      for i in range(args.n * args.repeat + 20)]
            db.session.add_all(orders)
            db.session.commit()
            bodies = [json.dumps(classic_callback(o.payhero_reference, o.checkout_request_id, o.id, o.amount,
                                                  o.phone, 0, "The service request is processed successfully."))
                      for o in orders]
        client = app.test_client()
        url = "/api/payhero/callback?token=sandbox"

        def post(body):
            response = client.post(url, data=body, content_type="application/json")
            assert response.status_code == 200, response.get_data(as_text=True)

        for body in bodies[:20]:  # warm up: connections, compiled statements
            post(body)

        def one_round(r):
            for body in bodies[20 + r * args.n: 20 + (r + 1) * args.n]:
                post(body)

        run_rounds(one_round, args.repeat, args.n, "callback")


if __name__ == "__main__":
    main()
