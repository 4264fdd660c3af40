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
    conn = Conn(target["host"], target["port"])
    for _ in range(count):
        answer = await conn.request("GET", PATH)
        if answer.status != 404:
            raise RuntimeError(f"{PATH} answered {answer.status}, not 404")
        if new_connections:
            conn.close()
    conn.close()


async def _load(args, target):
    each = max(args.n // args.connections, 1)
    await asyncio.gather(*(_requests(target, each, args.new_connections) for _ in range(args.connections)))
    return each * args.connections


async def run(args, target):
    await _load(args, target)  # warm: pools, caches, the first requests' imports
    usage = Usage(target).start()
    started = time.perf_counter()
    count = await _load(args, target)
    seconds = time.perf_counter() - started
    result = usage.stop()
    cpu = worker_cpu_total(result)
    result.update(requests=count, requests_per_second=rounded(count / seconds),
                  worker_cpu_us_per_request=None if cpu is None else round(cpu / count * 1e6))
    return result


def summary(result):
    return (f"{result['requests']} requests, {result['requests_per_second']}/s; worker CPU "
            f"{result['worker_cpu_us_per_request']} us a request; machine busy {result['machine_busy_percent']} %")
