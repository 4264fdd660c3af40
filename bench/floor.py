"""floor: the worker's CPU a request on a route that does almost nothing: what every answer costs at least.

A 404 for a place in no line (`GET /api/queue/x`: routing, the view, a JSON
error body, the answer written) reads neither the database nor Redis, so what
it costs is Flask, gunicorn and the socket under the gevent worker.  N requests
on --connections kept-alive connections (or a new connection each with
--new-connections, as phones at sales open), after as many again to warm up.
A journey's CPU is set against this floor.
"""
import asyncio
import time

from .client import Conn
from .results import rounded
from .server import Usage, worker_cpu_total

SERVER = {"WEB_CONCURRENCY": "1"}
PATH = "/api/queue/x"


def add_arguments(parser):
    parser.add_argument("-n", type=int, default=20000, help="requests measured (default 20000)")
    parser.add_argument("--connections", type=int, default=50, help="connections at once (default 50)")
    parser.add_argument("--new-connections", action="store_true", help="a new connection for each request")


async def _requests(target, count, new_connections):
    """`count` requests on one connection (or each on its own); the answers that were not the route's 404."""
    conn, wrong = Conn(target["host"], target["port"]), []
    for _ in range(count):
        answer = await conn.request("GET", PATH)
        if answer.status != 404:
            wrong.append(answer.status)
        if new_connections:
            conn.close()
    conn.close()
    return wrong


async def _load(args, target):
    """Exactly args.n requests over args.connections connections; the wrong answers."""
    each, extra = divmod(args.n, args.connections)
    counts = [each + (i < extra) for i in range(args.connections)]
    answers = await asyncio.gather(*(_requests(target, count, args.new_connections) for count in counts if count))
    return [status for wrong in answers for status in wrong]


async def run(args, target):
    await _load(args, target)  # warm: pools, caches, the first requests' imports
    usage = Usage(target).start()
    started = time.perf_counter()
    wrong = await _load(args, target)
    seconds = time.perf_counter() - started
    result = usage.stop()
    cpu = worker_cpu_total(result)
    result.update(requests=args.n, requests_per_second=rounded(args.n / seconds),
                  worker_cpu_us_per_request=None if cpu is None else round(cpu / args.n * 1e6),
                  failures=[f"{len(wrong)} answers were not {PATH}'s 404: {sorted(set(wrong))}"] if wrong else [])
    return result


def summary(result):
    return (f"{result['requests']} requests, {result['requests_per_second']}/s; worker CPU "
            f"{result['worker_cpu_us_per_request']} us a request; machine busy {result['machine_busy_percent']} %")
