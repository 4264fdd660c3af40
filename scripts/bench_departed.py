#!/usr/bin/env python3
"""How fast one gunicorn worker lets go of held waits whose clients left.

    .venv/bin/python scripts/bench_departed.py -n 1000 --repeat 3

Starts the service as scripts/loadtest.py does (gunicorn from the Procfile, one
gevent worker, a fresh PostgreSQL database, Redis), creates N orders, holds one
wait per order over a raw socket each, then closes every socket at once and
polls /metrics until the worker holds no wait and no channel.  Prints, per run:
seconds from the last close to `eventi_waiters` 0, to `eventi_subscribed_channels`
0, to the worker's open files down by N (every request finished and its socket
closed), and the `eventi_waits_departed_total` count.
"""
import argparse
import concurrent.futures
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import LiveServer  # noqa: E402

ORDER = {"event": "test-this-end-to-end", "ticket_type": "early-bird", "quantity": 1,
         "name": "Departure Test", "email": "leave@example.com", "phone": "0708000004"}  # never called back


def metrics(url):
    out = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def open_files(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def until(predicate, timeout, interval, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)
    return time.monotonic()


def run_once(n):
    env = {"WEB_CONCURRENCY": "1", "LOG_LEVEL": "warning", "REDIS_PREFIX": f"departed:{uuid.uuid4().hex[:8]}:"}
    server = LiveServer(env, Path(tempfile.mkdtemp(prefix="eventi-departed-")) / "gunicorn.log").start(timeout=60)
    try:
        with requests.Session() as session, concurrent.futures.ThreadPoolExecutor(8) as pool:
            orders = list(pool.map(lambda _: session.post(server.url + "/api/orders", json=ORDER, timeout=30).json(),
                                   range(n)))
        worker = int(Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()[0])
        socks = []
        for order in orders:
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(f"GET /api/orders/{order['id']}/wait?timeout=55&since={order['version']} HTTP/1.1\r\n"
                         f"Host: 127.0.0.1\r\n\r\n".encode())
            socks.append(sock)
        until(lambda: metrics(server.url).get("eventi_waiters") == n, 60, 0.1, f"{n} waits held")
        until(lambda: metrics(server.url).get("eventi_subscribed_channels") == n, 30, 0.1, f"{n} channels")
        files_holding = open_files(worker)
        closing = time.monotonic()
        for sock in socks:
            sock.close()
        closed = time.monotonic()
        released = until(lambda: metrics(server.url).get("eventi_waiters") == 0, 30, 0.005, "no wait held")
        unsubscribed = until(lambda: metrics(server.url).get("eventi_subscribed_channels") == 0, 30, 0.005, "no channel")
        finished = until(lambda: open_files(worker) <= files_holding - n, 30, 0.005,
                         lambda: f"the worker's open files down by {n} (from {files_holding}: {open_files(worker)})")
        count = metrics(server.url).get("eventi_waits_departed_total")
        return {"close_all_s": closed - closing, "released_s": released - closed,
                "unsubscribed_s": unsubscribed - closed, "finished_s": finished - closed, "departed_metric": count}
    finally:
        server.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="held waits to drop (default 1000)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runs = []
    for i in range(args.repeat):
        result = run_once(args.n)
        runs.append(result)
        print(f"run {i + 1}: {args.n} closed in {result['close_all_s'] * 1000:.1f} ms; "
              f"all let go {result['released_s'] * 1000:.0f} ms after the last close, "
              f"all unsubscribed {result['unsubscribed_s'] * 1000:.0f} ms after, "
              f"every socket closed {result['finished_s'] * 1000:.0f} ms after; "
              f"eventi_waits_departed_total {result['departed_metric']:.0f}", flush=True)
    if len(runs) > 1:
        print(f"median: let go {statistics.median(r['released_s'] for r in runs) * 1000:.0f} ms, "
              f"unsubscribed {statistics.median(r['unsubscribed_s'] for r in runs) * 1000:.0f} ms, "
              f"sockets closed {statistics.median(r['finished_s'] for r in runs) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
