"""CPU and wall time of creating one order, in-process, on PostgreSQL and Redis, sandbox PayHero included.

No load generator: the Flask test client POSTs N orders one after another,
and the sandbox PayHero is served by the same app from a gevent WSGI server
in this process, so its HTTP round trip (the client's request, the sandbox's
answer) is counted as it is in a worker.  The figure is an order's own cost
with nothing else running; the median of --repeat rounds is printed.
--profile FILE writes a cProfile of the last round (read it with --top).

    .venv/bin/python scripts/bench_order.py [-n 1000] [--repeat 5] [--profile /tmp/order.prof]
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

from bench_callback import ROOT, run_rounds, scratch_app  # noqa: E402

sys.path.insert(0, ROOT)

ORDER = {"event": "test-this-end-to-end", "ticket_type": "early-bird", "quantity": 2,
         "name": "Bench", "email": "bench@example.com", "phone": "0708000004"}  # the sandbox never calls back


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="orders per round")
    parser.add_argument("--repeat", type=int, default=5, help="rounds")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the last round into FILE")
    parser.add_argument("--top", type=int, default=30, help="with --profile: functions to print")
    args = parser.parse_args()

    from gevent.pywsgi import WSGIServer

    with scratch_app("bench_order", args.redis_url, sandbox_port=True) as (app, port):
        listener = socket.create_server(("127.0.0.1", port))
        # As gunicorn's listener: without it the sandbox's answer (headers, then body) meets the
        # client's delayed ACK and every order waits 40 ms.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = WSGIServer(listener, app, log=None)
        server.start()
        client = app.test_client()

        def post():
            response = client.post("/api/orders", json=ORDER)
            assert response.status_code == 201, response.get_data(as_text=True)

        for _ in range(20):  # warm up: connections, compiled statements
            post()

        def one_round(_):
            for _ in range(args.n):
                post()

        profiler = cProfile.Profile() if args.profile else None
        run_rounds(one_round, args.repeat, args.n, "order (sandbox PayHero included)", profiler)
        server.stop()
        if profiler:
            profiler.dump_stats(args.profile)
            stats = pstats.Stats(args.profile)
            stats.sort_stats("cumulative").print_stats(args.top)
            stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
