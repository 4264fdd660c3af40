#!/usr/bin/env python3
"""Load test for the payment-status service: held long polls vs short polling, and callback throughput.

    .venv/bin/python scripts/loadtest.py -n 1000 --rate 200            # start a server, long poll
    .venv/bin/python scripts/loadtest.py -n 500 --rate 50 --mode both  # long poll, then short poll, same server
    .venv/bin/python scripts/loadtest.py -n 6000 --rate 300 --mode callbacks
    .venv/bin/python scripts/loadtest.py --mode drop -n 6000 --concurrency 300 --workers 2  # a ticket drop
    .venv/bin/python scripts/loadtest.py --url http://127.0.0.1:8000 --worker-pid 1234 -n 100
    .venv/bin/python scripts/loadtest.py -n 1000 --rate 200 --cluster --classic-contrast  # on a Redis Cluster

Without --url it starts the service itself the way production does: a fresh
PostgreSQL database, the Procfile's release step, `flask seed-demo`, then the
Procfile's web line (gunicorn, one gevent worker) with Redis, limits off and
LOG_LEVEL=warning (change with --server-env LOG_LEVEL=info).  Each --repeat
gets a fresh server and database; the table shows every run and the medians.

The client is one asyncio loop speaking HTTP/1.1 over plain sockets: one
connection per held wait (as a browser tab has), keep-alive pools for order
creation and callbacks, no thread per request.  Orders use the sandbox phone
0708000004 (the sandbox never calls back); the load test POSTs the classic
callback itself, at --rate per second, open loop (the schedule does not wait
for the server), in the order the waits were opened.

--mode drop is the moment sales open: N buyers, --concurrency at a time, each
on its own connection (as browsers are), POST one order each for --quantity
tickets of one ticket type that has --tickets left (default: enough for all).
It reports orders/s, the answer time (p50/p99/max), the status codes, and
then reads the database: whether tickets were oversold, and whether any
buyer who was not answered 201 still holds tickets.

With --cluster the server runs on a 3-primary Redis Cluster started for the
run; on any Redis each node's share of the pub/sub traffic during the
callbacks is printed (INFO commandstats, and CLUSTER INFO's bus counters), and
--classic-contrast then publishes as many messages with classic PUBLISH on the
same cluster, which every node carries.

Latency is callback sent -> wait answered, both stamped by this process:
the customer's latency, callback processing included.  Requests and DB queries
per payment come from counting our own requests and from /metrics
(`eventi_db_queries_total` deltas: every SQL statement the worker ran).
"""
import argparse
import asyncio
import collections
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eventi_flask.payhero.sandbox import SUCCESS, classic_callback  # noqa: E402

NO_CALLBACK_PHONE = "0708000004"
ORDER = {"event": "test-this-end-to-end", "ticket_type": "early-bird", "quantity": 1,
         "name": "Load Test", "email": "load@example.com", "phone": NO_CALLBACK_PHONE}


# ---------------------------------------------------------------- HTTP/1.1 over asyncio streams

class HttpError(Exception):
    pass


class Conn:
    """One keep-alive HTTP/1.1 connection.  Requests on it run one at a time."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    def send(self, method, path, body=None, content_type="application/json"):
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))

    async def receive(self):
        """(status, body bytes); closes the connection if the server asked to."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.close()
            raise HttpError(f"connection lost: {exc!r}") from None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        body = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, body

    async def request(self, method, path, body=None):
        if self.writer is None:
            await self.open()
        self.send(method, path, body)
        return await self.receive()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Pool:
    """Keep-alive connections, opened on demand up to `size`."""

    def __init__(self, host, port, size):
        self.host, self.port = host, port
        self.free = asyncio.Queue()
        self.opened = 0
        self.size = size

    async def request(self, method, path, body=None, on_sent=None):
        if self.free.empty() and self.opened < self.size:
            self.opened += 1
            conn = Conn(self.host, self.port)
        else:
            conn = await self.free.get()
        try:
            for attempt in (1, 2):
                reused = conn.writer is not None
                if not reused:
                    await conn.open()
                conn.send(method, path, body)
                if on_sent:
                    on_sent()
                try:
                    return await conn.receive()
                except HttpError:
                    # An idle keep-alive connection the server has closed: a GET may go again.
                    if not (reused and method == "GET" and attempt == 1):
                        raise
        except (OSError, HttpError):
            conn.close()
            raise
        finally:
            self.free.put_nowait(conn)

    def close(self):
        while not self.free.empty():
            self.free.get_nowait().close()


# ---------------------------------------------------------------- what the server tells us

def parse_metrics(text):
    """{metric name with labels: value} from Prometheus text."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


async def scrape(pool):
    status, body = await pool.request("GET", "/metrics")
    if status != 200:
        raise HttpError(f"/metrics answered {status}")
    return parse_metrics(body.decode())


def rss_mb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid):
    """User + system CPU time the process has used so far."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def local_tcp_ports(pid):
    """The local ports of the TCP sockets process `pid` holds (IPv4 and IPv6)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def redis_node_urls(redis_url):
    """The URL of every primary when `redis_url` names a Redis Cluster node, else [redis_url]."""
    import redis

    with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
        if client.info("cluster").get("cluster_enabled") != 1:
            return [redis_url]
        ranges = client.execute_command("CLUSTER SLOTS")
    scheme = urlsplit(redis_url).scheme
    primaries = sorted({(r[2][0].decode() or "127.0.0.1", r[2][1]) for r in ranges})
    return [f"{scheme}://{host}:{port}" for host, port in primaries]


def redis_connections(redis_url, pid):
    """{"subscriber": n, "other": n} Redis connections held by process `pid` (CLIENT LIST on every node + /proc)."""
    import redis

    clients = []
    for url in redis_node_urls(redis_url):
        with redis.Redis.from_url(url, socket_timeout=5) as client:
            clients += client.client_list()
    ports = local_tcp_ports(pid)
    subscriber = sum(1 for c in clients if c.get("name") == f"eventi-sub-{pid}")
    mine = sum(1 for c in clients if int(c["addr"].rsplit(":", 1)[1]) in ports)
    return {"subscriber": subscriber, "other": mine - subscriber}


def pubsub_counters(redis_url):
    """{node: counters} of the pub/sub traffic each node has carried (INFO commandstats, stats, CLUSTER INFO)."""
    import redis

    counters = {}
    for url in redis_node_urls(redis_url):
        with redis.Redis.from_url(url, socket_timeout=5) as client:
            commands = client.info("commandstats")
            stats = client.info("stats")
            cluster = client.execute_command("CLUSTER INFO") if client.info("cluster").get("cluster_enabled") else {}
        counters[urlsplit(url).netloc] = {
            "publish_calls": commands.get("cmdstat_publish", {}).get("calls", 0),
            "spublish_calls": commands.get("cmdstat_spublish", {}).get("calls", 0),
            # Messages that reached this node over the cluster bus (classic PUBLISH goes to every node).
            "bus_publish_received": int(cluster.get("cluster_stats_messages_publish_received", 0)),
            "bus_publishshard_received": int(cluster.get("cluster_stats_messages_publishshard_received", 0)),
            "net_output_bytes": stats.get("total_net_output_bytes", 0),
        }
    return counters


def pubsub_shares(before, after):
    """Per node: what it carried between the two readings, and its share of the publishes."""
    deltas = {node: {k: after[node][k] - before[node].get(k, 0) for k in after[node]} for node in after if node in before}
    for counters in deltas.values():
        counters["messages"] = (counters["publish_calls"] + counters["spublish_calls"]
                                + counters["bus_publish_received"] + counters["bus_publishshard_received"])
    total = sum(c["publish_calls"] + c["spublish_calls"] for c in deltas.values()) or 1
    for counters in deltas.values():
        counters["share_of_publishes"] = round(counters["messages"] / total, 3)
    return deltas


def worker_pids_of(master_pid):
    try:
        return [int(pid) for pid in Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()]
    except OSError:
        return []


class Sampler:
    """Samples the worker's RSS and open files every 0.25 s; keeps the peaks."""

    def __init__(self, pid):
        self.pid = pid
        self.rss_peak = 0.0
        self.fds_peak = 0
        self._task = None

    def start(self):
        if self.pid:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self):
        while True:
            self.rss_peak = max(self.rss_peak, rss_mb(self.pid) or 0)
            self.fds_peak = max(self.fds_peak, open_fds(self.pid) or 0)
            await asyncio.sleep(0.25)

    def stop(self):
        if self._task:
            self._task.cancel()


# ---------------------------------------------------------------- the load

def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


async def create_orders(pool, n, concurrency):
    orders, errors = [], []
    queue = list(range(n))

    async def worker():
        body = json.dumps(ORDER).encode()
        while queue:
            queue.pop()
            try:
                status, raw = await pool.request("POST", "/api/orders", body)
            except (OSError, HttpError) as exc:
                errors.append(repr(exc))
                continue
            if status != 201:
                errors.append(f"{status} {raw[:200]!r}")
                continue
            orders.append(json.loads(raw))

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if errors:
        raise SystemExit(f"creating orders failed {len(errors)} times, first: {errors[0]}")
    return orders, n / (time.monotonic() - started)


def callback_body(order):
    payment = order["payment"]
    body = classic_callback(payment["reference"], payment["checkout_request_id"], order["id"], order["amount"],
                            "254708000004", *SUCCESS)
    return json.dumps(body).encode()


class Payment:
    """One order's story: when its callback went out, when the customer saw it, how many requests it took."""

    __slots__ = ("order", "due_at", "sent_at", "answered_at", "requests", "status", "error", "callback_ms")

    def __init__(self, order):
        self.order = order
        self.due_at = self.sent_at = self.answered_at = self.callback_ms = None
        self.requests = 0
        self.status = None
        self.error = None

    def observe(self, status, raw, deadline):
        """Record one status answer; return the order if it is still pending and worth asking again."""
        now = time.monotonic()
        if status != 200:
            self.error = f"{status} {raw[:120]!r}"
            return None
        order = json.loads(raw)
        if order["status"] != "pending":
            self.answered_at, self.status = now, order["status"]
            return None
        if now > deadline:
            self.error = "still pending at the end of the run"
            return None
        return order


async def fire_callbacks(pool, payments, rate, token, stats):
    """Open loop: callback i leaves at start + i/rate whatever happened to the others (rate 0: back to back)."""
    path = f"/api/payhero/callback?token={token}"

    async def one(payment):
        body = callback_body(payment.order)

        def sent():
            payment.sent_at = time.monotonic()

        try:
            status, raw = await pool.request("POST", path, body, on_sent=sent)
        except (OSError, HttpError) as exc:
            stats["callback_errors"].append(repr(exc))
            return
        payment.callback_ms = (time.monotonic() - payment.sent_at) * 1000
        if status != 200 or json.loads(raw).get("status") != "completed":
            stats["callback_errors"].append(f"{status} {raw[:200]!r}")

    started = time.monotonic()
    tasks = []
    for i, payment in enumerate(payments):
        payment.due_at = started + i / rate if rate else None
        if rate:
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(payment)))
        if not rate and len(tasks) % pool.size == 0:
            await asyncio.sleep(0)  # let the pool's connections go round
    await asyncio.gather(*tasks)
    done = max((p.sent_at + p.callback_ms / 1000 for p in payments if p.callback_ms is not None), default=started)
    stats["callback_seconds"] = done - started
    # Open loop, honestly: if every callback connection is busy, a callback leaves late; say how late.
    lags = [(p.sent_at - p.due_at) * 1000 for p in payments if p.due_at is not None and p.sent_at is not None]
    stats["send_lag_ms_p99"] = percentile(lags, 99)
    stats["callbacks_per_second"] = len(payments) / (done - started) if done > started else None


async def hold_wait(host, port, payment, timeout, deadline, opening):
    """The status page's loop: wait with since=<version> until the order is final (or the run's deadline)."""
    version = payment.order["version"]
    conn = Conn(host, port)
    try:
        async with opening:
            await conn.open()
            conn.send("GET", f"/api/orders/{payment.order['id']}/wait?timeout={timeout:g}&since={version}")
        while True:
            payment.requests += 1
            status, raw = await conn.receive()
            order = payment.observe(status, raw, deadline)
            if order is None:
                return
            version = order["version"]
            if conn.writer is None:
                await conn.open()
            conn.send("GET", f"/api/orders/{payment.order['id']}/wait?timeout={timeout:g}&since={version}")
    except (OSError, HttpError, ValueError) as exc:
        payment.error = repr(exc)
    finally:
        conn.close()


async def short_poll(host, port, payment, interval, deadline, opening):
    """The old status page: GET the order every `interval` seconds on a keep-alive connection."""
    conn = Conn(host, port)
    try:
        async with opening:
            await conn.open()
        await asyncio.sleep(random.uniform(0, interval))  # page loads are spread out
        while True:
            tick = time.monotonic()
            payment.requests += 1
            status, raw = await conn.request("GET", f"/api/orders/{payment.order['id']}")
            if payment.observe(status, raw, deadline) is None:
                return
            await asyncio.sleep(max(0, tick + interval - time.monotonic()))
    except (OSError, HttpError, ValueError) as exc:
        payment.error = repr(exc)
    finally:
        conn.close()


async def paced(rate, coroutines):
    """Start the coroutines at `rate` per second (customers arrive; they do not all click at once)."""
    started, tasks = time.monotonic(), []
    for i, coroutine in enumerate(coroutines):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(coroutine))
    return tasks


async def wait_for_waiters(pool, payments, limit):
    """Until the worker holds a wait for every payment that has not failed (or `limit` seconds pass)."""
    deadline = time.monotonic() + limit
    held = 0
    while time.monotonic() < deadline:
        held = (await scrape(pool)).get("eventi_waiters", 0)
        if held + sum(1 for p in payments if p.error or p.answered_at) >= len(payments):
            break
        await asyncio.sleep(0.25)
    return held


async def run_status_phase(args, target, mode):
    """Create N orders, watch them (long poll or short poll), pay them at --rate; measure."""
    host, port = target["host"], target["port"]
    api = Pool(host, port, args.create_concurrency)
    callbacks = Pool(host, port, args.callback_connections)
    orders, create_rate = await create_orders(api, args.n, args.create_concurrency)
    payments = [Payment(order) for order in orders]
    sampler = Sampler(target.get("worker_pid"))
    sampler.start()
    stats = {"callback_errors": []}
    opening = asyncio.Semaphore(args.open_concurrency)
    profiler = start_profiler(args, target)
    m0 = await scrape(api)
    cpu0 = cpu_seconds(target.get("worker_pid"))
    client0 = time.process_time()
    started = time.monotonic()
    deadline = started + args.timeout + args.n / args.rate + 60 if args.rate else started + 600
    if mode == "long-poll":
        tasks = await paced(args.open_rate, [hold_wait(host, port, p, args.timeout, deadline, opening) for p in payments])
        held = await wait_for_waiters(api, payments, 120)
    else:
        tasks = await paced(args.open_rate, [short_poll(host, port, p, args.poll_interval, deadline, opening) for p in payments])
        while opening.locked() or opening._value < args.open_concurrency:
            await asyncio.sleep(0.1)
        held = None
    hold_seconds = time.monotonic() - started
    cpu1 = cpu_seconds(target.get("worker_pid"))
    m1 = await scrape(api)
    first_requests = sum(p.requests for p in payments)
    connections = redis_connections(target["redis_url"], target["worker_pid"]) if target.get("worker_pid") and target.get("redis_url") else None
    fds_holding = open_fds(target["worker_pid"]) if target.get("worker_pid") else None
    rss_holding = rss_mb(target["worker_pid"]) if target.get("worker_pid") else None
    await asyncio.sleep(args.settle)
    traffic0 = pubsub_counters(target["redis_url"]) if target.get("redis_url") else None
    await fire_callbacks(callbacks, payments, args.rate, args.token, stats)
    await asyncio.wait(tasks, timeout=max(5, deadline - time.monotonic()))
    traffic = pubsub_shares(traffic0, pubsub_counters(target["redis_url"])) if traffic0 is not None else None
    for task in tasks:
        task.cancel()
    m2 = await scrape(api)
    cpu2 = cpu_seconds(target.get("worker_pid"))
    client_cpu = time.process_time() - client0
    stop_profiler(profiler)
    sampler.stop()
    api.close()
    callbacks.close()

    n = len(payments)
    answered = [p for p in payments if p.answered_at is not None and p.sent_at is not None]
    latencies = [(p.answered_at - p.sent_at) * 1000 for p in answered]
    wrong = [p for p in answered if p.status != "completed"]
    errors = [p.error for p in payments if p.error] + stats["callback_errors"]
    queries = m2.get("eventi_db_queries_total", 0) - m0.get("eventi_db_queries_total", 0)
    hold_queries = m1.get("eventi_db_queries_total", 0) - m0.get("eventi_db_queries_total", 0)
    requests = sum(p.requests for p in payments)
    return {
        "mode": mode,
        "orders": n,
        "orders_created_per_second": round(create_rate, 1),
        "waiters_held": held,
        "seconds_to_hold_all": round(hold_seconds, 2),
        "notified": len(answered) - len(wrong),
        "wrong_status": len(wrong),
        "errors": len(errors),
        "first_errors": errors[:5],
        "latency_ms": {q: _round(percentile(latencies, q)) for q in (50, 90, 99, 100)},
        "callback_response_ms": {q: _round(percentile([p.callback_ms for p in payments if p.callback_ms], q)) for q in (50, 99)},
        # Server side, publish after the commit -> wait answered, to the histogram's bucket bound.
        "server_delivery_ms_le": {q: histogram_quantile(m0, m2, "eventi_delivery_latency_seconds", q) for q in (50, 99)},
        "callbacks_per_second": _round(stats.get("callbacks_per_second")),
        "callback_send_lag_ms_p99": _round(stats.get("send_lag_ms_p99")),
        "status_requests_per_payment": round(requests / n, 3),
        "db_queries_per_payment": round(queries / n, 3),
        "db_queries_per_first_request": round(hold_queries / first_requests, 3) if first_requests else None,
        "worker_cpu_ms_per_first_request": _round((cpu1 - cpu0) * 1000 / first_requests) if cpu0 is not None and first_requests else None,
        "client_cpu_ms_per_payment": _round(client_cpu * 1000 / n),
        "worker_cpu_ms_per_payment": _round((cpu2 - cpu0) * 1000 / n) if cpu0 is not None else None,
        "worker_rss_mb_holding": _round(rss_holding),
        "worker_rss_mb_peak": _round(sampler.rss_peak) if sampler.pid else None,
        **gc_pauses(m0, m2),
        "worker_open_files_holding": fds_holding,
        "worker_open_files_peak": sampler.fds_peak if sampler.pid else None,
        "redis_connections": connections,
        "pubsub_by_node": traffic,
        "pubsub_busiest_node_share": max((c["share_of_publishes"] for c in traffic.values()), default=None) if traffic else None,
    }


async def run_callbacks_phase(args, target):
    """Callback throughput: N orders, N callbacks at --rate (0: as fast as --callback-connections allow)."""
    host, port = target["host"], target["port"]
    api = Pool(host, port, args.create_concurrency)
    callbacks = Pool(host, port, args.callback_connections)
    orders, create_rate = await create_orders(api, args.n, args.create_concurrency)
    payments = [Payment(order) for order in orders]
    stats = {"callback_errors": []}
    sampler = Sampler(target.get("worker_pid"))
    sampler.start()
    profiler = start_profiler(args, target)
    m0 = await scrape(api)
    cpu0 = cpu_seconds(target.get("worker_pid"))
    await fire_callbacks(callbacks, payments, args.rate, args.token, stats)
    cpu1 = cpu_seconds(target.get("worker_pid"))
    m1 = await scrape(api)
    stop_profiler(profiler)
    sampler.stop()
    api.close()
    callbacks.close()
    times = [p.callback_ms for p in payments if p.callback_ms is not None]
    queries = m1.get("eventi_db_queries_total", 0) - m0.get("eventi_db_queries_total", 0)
    return {
        "mode": "callbacks",
        "orders": len(payments),
        "orders_created_per_second": round(create_rate, 1),
        "offered_rate": args.rate or "max",
        "callbacks_per_second": _round(stats.get("callbacks_per_second")),
        "errors": len(stats["callback_errors"]),
        "first_errors": stats["callback_errors"][:5],
        "callback_response_ms": {q: _round(percentile(times, q)) for q in (50, 90, 99, 100)},
        "db_queries_per_callback": round(queries / len(payments), 3),
        "worker_cpu_ms_per_callback": _round((cpu1 - cpu0) * 1000 / len(payments)) if cpu0 is not None else None,
        "worker_rss_mb_peak": _round(sampler.rss_peak) if sampler.pid else None,
    }


async def buy(host, port, body, timeout):
    """One buyer: its own connection, one POST /api/orders; (status or error name, seconds, body)."""
    conn = Conn(host, port)
    started = time.monotonic()
    try:
        status, raw = await asyncio.wait_for(conn.request("POST", "/api/orders", body), timeout)
    except (OSError, HttpError, asyncio.TimeoutError) as exc:
        status, raw = type(exc).__name__, b""
    finally:
        conn.close()
    return status, time.monotonic() - started, raw


def drop_ledger(database_url, ticket_type, sold_ids):
    """What the database says after a drop: capacity, reserved, and tickets held by buyers not told 201."""
    from sqlalchemy import create_engine, text

    from config import database_url as sqlalchemy_url

    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.connect() as connection:
            type_id, capacity, reserved = connection.execute(text(
                "SELECT t.id, t.capacity, t.reserved FROM ticket_types t JOIN events e ON e.id = t.event_id "
                "WHERE e.slug = :slug AND t.code = :code"), {"slug": ORDER["event"], "code": ticket_type}).one()
            orders = connection.execute(text("SELECT id, status, quantity FROM orders WHERE ticket_type_id = :id"),
                                        {"id": type_id}).all()
            sessions = None
            if connection.dialect.name == "postgresql":  # connections the server opened, ours included
                sessions = connection.execute(text(
                    "SELECT sessions FROM pg_stat_database WHERE datname = current_database()")).scalar()
    finally:
        engine.dispose()
    holding = [(order_id, quantity) for order_id, status, quantity in orders if status in ("pending", "completed")]
    return {
        "capacity": capacity,
        "reserved": reserved,
        "oversold": max(reserved - capacity, 0),
        "held_by_orders": sum(quantity for _, quantity in holding),
        "held_without_201": sum(quantity for order_id, quantity in holding if order_id not in sold_ids),
        "database_sessions": sessions,
    }


def set_tickets(database_url, ticket_type, tickets):
    """Give the ticket type `tickets` free tickets before the drop."""
    from sqlalchemy import create_engine, text

    from config import database_url as sqlalchemy_url

    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "UPDATE ticket_types SET capacity = :tickets, reserved = 0 WHERE code = :code "
                "AND event_id = (SELECT id FROM events WHERE slug = :slug)"),
                {"tickets": tickets, "code": ticket_type, "slug": ORDER["event"]})
    finally:
        engine.dispose()


async def run_drop_phase(args, target):
    """The ticket drop: N buyers, --concurrency at a time, each POSTs one order; then check the ledger."""
    host, port = target["host"], target["port"]
    database_url = target.get("database_url")
    tickets = args.tickets if args.tickets is not None else args.n * args.quantity
    if database_url:
        set_tickets(database_url, args.ticket_type, tickets)
    body = json.dumps({**ORDER, "ticket_type": args.ticket_type, "quantity": args.quantity,
                       "phone": args.phone}).encode()
    answers = []
    remaining = [args.n]

    async def buyer():
        while remaining[0] > 0:
            remaining[0] -= 1
            answers.append(await buy(host, port, body, args.order_timeout))

    pids = target.get("worker_pids") or []
    profiler = start_profiler(args, target)
    cpu0 = [cpu_seconds(pid) for pid in pids]
    client0 = time.process_time()
    started = time.monotonic()
    await asyncio.gather(*(buyer() for _ in range(args.concurrency)))
    elapsed = time.monotonic() - started
    cpu1 = [cpu_seconds(pid) for pid in pids]
    client_cpu = time.process_time() - client0
    stop_profiler(profiler)

    statuses = collections.Counter(str(status) for status, _, _ in answers)
    sold_ids = {json.loads(raw)["id"] for status, _, raw in answers if status == 201}
    seconds = [s * 1000 for _, s, _ in answers]
    errors = [f"{status} {raw[:200]!r}" for status, _, raw in answers if status not in (201, 409)]
    worker_cpu = sum(b - a for a, b in zip(cpu0, cpu1) if a is not None and b is not None) if pids else None
    result = {
        "mode": "drop",
        "orders": args.n,
        "concurrency": args.concurrency,
        "workers": target.get("workers"),
        "tickets": tickets,
        "quantity": args.quantity,
        "orders_per_second": _round(statuses["201"] / elapsed),
        "answers_per_second": _round(len(answers) / elapsed),
        "drop_seconds": _round(elapsed),
        "answer_ms": {q: _round(percentile(seconds, q)) for q in (50, 90, 99, 100)},
        "statuses": dict(sorted(statuses.items())),
        "errors": len(errors),
        "first_errors": errors[:5],
        "worker_cpu_ms_per_order": _round(worker_cpu * 1000 / len(answers)) if worker_cpu is not None else None,
        "client_cpu_ms_per_order": _round(client_cpu * 1000 / len(answers)),
    }
    if database_url:
        result["ledger"] = drop_ledger(database_url, args.ticket_type, sold_ids)
        result["ledger"]["sold_201"] = len(sold_ids) * args.quantity
    return result


def start_profiler(args, target):
    """py-spy on the worker for the measured part of a phase (--py-spy FILE: collapsed stacks)."""
    if not args.py_spy or not target.get("worker_pid"):
        return None
    py_spy = Path(sys.executable).parent / "py-spy"
    command = [str(py_spy), "record", "--pid", str(target["worker_pid"]), "--rate", "250", "--nonblocking",
               "--format", "raw", "--output", args.py_spy]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # let it attach before the load starts
    return proc


def stop_profiler(proc):
    if proc is not None:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def histogram_quantile(before, after, name, q):
    """The upper bound (le) of the bucket holding quantile q of a Prometheus histogram, between two scrapes."""
    buckets = []
    for key, value in after.items():
        if key.startswith(name + "_bucket{"):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), value - before.get(key, 0)))
    buckets.sort()
    if not buckets or not buckets[-1][1]:
        return None
    for le, count in buckets:
        if count >= q / 100 * buckets[-1][1]:
            return le * 1000
    return None


def gc_pauses(before, after):
    """Full (generation 2) collections in the worker between two scrapes: how many, total and longest pause."""
    key = 'eventi_gc_pause_seconds_%s{generation="2"}'
    count = after.get(key % "count", 0) - before.get(key % "count", 0)
    total = after.get(key % "sum", 0) - before.get(key % "sum", 0)
    longest = histogram_quantile(
        {k: v for k, v in before.items() if 'generation="2"' in k},
        {k: v for k, v in after.items() if 'generation="2"' in k}, "eventi_gc_pause_seconds", 100)
    return {"gc_full_collections": int(count), "gc_full_pause_ms_total": _round(total * 1000),
            "gc_full_pause_ms_max_le": longest}


def _round(value, digits=2):
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------- the server

def start_cluster():
    """A 3-primary Redis Cluster of our own on spare ports (the one the tests use)."""
    from tests.redis_cluster import RedisCluster

    cluster = RedisCluster(Path(tempfile.mkdtemp(prefix="eventi-loadtest-cluster-"))).start()
    print(f"Redis Cluster: {' '.join(n.address for n in cluster.nodes)}", file=sys.stderr)
    return cluster


def classic_publish_contrast(redis_url, n, rate, payload_bytes=900):
    """Classic PUBLISH of n order-sized messages on the cluster, spread over its primaries: what each node carries."""
    import redis

    clients = [redis.Redis.from_url(url, socket_timeout=5) for url in redis_node_urls(redis_url)]
    before = pubsub_counters(redis_url)
    payload = "x" * payload_bytes
    started = time.monotonic()
    for i in range(n):
        if rate:
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
        clients[i % len(clients)].publish(f"loadtest:classic:order:status:{i}", payload)
    for client in clients:
        client.close()
    return {"mode": "classic PUBLISH", "orders": n, "pubsub_by_node": pubsub_shares(before, pubsub_counters(redis_url))}


def start_server(args, redis_url=None):
    from tests.support import REDIS_URL, LiveServer

    workers = args.workers or (2 if args.mode == "drop" else 1)
    scratch = Path(tempfile.mkdtemp(prefix="eventi-loadtest-"))
    env = {"WEB_CONCURRENCY": str(workers), "LOG_LEVEL": "warning",
           "REDIS_PREFIX": f"loadtest:{uuid.uuid4().hex[:8]}:"}
    if args.database == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{scratch}/loadtest.sqlite3"
    if redis_url:
        env["REDIS_URL"] = redis_url
    for item in args.server_env:
        name, _, value = item.partition("=")
        env[name] = value
    log_path = scratch / "gunicorn.log"
    server = LiveServer(env, log_path).start(timeout=60)
    pids = []
    deadline = time.monotonic() + 10
    while len(pids) < workers and time.monotonic() < deadline:
        pids = worker_pids_of(server.proc.pid)
        time.sleep(0.05)
    return server, {"url": server.url, "worker_pid": pids[0] if pids else None, "worker_pids": pids,
                    "workers": workers, "database_url": server.env["DATABASE_URL"],
                    "redis_url": server.env.get("REDIS_URL", REDIS_URL), "log": str(log_path), "server_env": env}


async def run_once(args, target):
    split = urlsplit(target["url"])
    target = {**target, "host": split.hostname, "port": split.port or 80}
    modes = {"long-poll": ["long-poll"], "short-poll": ["short-poll"], "both": ["long-poll", "short-poll"],
             "callbacks": ["callbacks"], "drop": ["drop"]}[args.mode]
    results = []
    for mode in modes:
        if mode == "drop":
            results.append(await run_drop_phase(args, target))
        elif mode == "callbacks":
            results.append(await run_callbacks_phase(args, target))
        else:
            results.append(await run_status_phase(args, target, mode))
    return results


# ---------------------------------------------------------------- the report

ROWS = [
    ("orders", "orders"),
    ("waiters held", "waiters_held"),
    ("notified (right status)", "notified"),
    ("wrong status", "wrong_status"),
    ("errors", "errors"),
    ("latency p50 ms", "latency_ms.50"),
    ("latency p90 ms", "latency_ms.90"),
    ("latency p99 ms", "latency_ms.99"),
    ("latency max ms", "latency_ms.100"),
    ("callbacks/s", "callbacks_per_second"),
    ("server publish->answer p50 <= ms", "server_delivery_ms_le.50"),
    ("server publish->answer p99 <= ms", "server_delivery_ms_le.99"),
    ("callback send lag p99 ms", "callback_send_lag_ms_p99"),
    ("callback response p50 ms", "callback_response_ms.50"),
    ("callback response p99 ms", "callback_response_ms.99"),
    ("status requests / payment", "status_requests_per_payment"),
    ("DB queries / payment", "db_queries_per_payment"),
    ("DB queries / first request", "db_queries_per_first_request"),
    ("DB queries / callback", "db_queries_per_callback"),
    ("worker CPU ms / first request", "worker_cpu_ms_per_first_request"),
    ("worker CPU ms / payment", "worker_cpu_ms_per_payment"),
    ("worker CPU ms / callback", "worker_cpu_ms_per_callback"),
    ("load generator CPU ms / payment", "client_cpu_ms_per_payment"),
    ("worker RSS MB holding", "worker_rss_mb_holding"),
    ("worker RSS MB peak", "worker_rss_mb_peak"),
    ("worker full GCs", "gc_full_collections"),
    ("worker full GC pause ms, total", "gc_full_pause_ms_total"),
    ("worker full GC pause ms, max <=", "gc_full_pause_ms_max_le"),
    ("worker open files holding", "worker_open_files_holding"),
    ("Redis subscriber conns", "redis_connections.subscriber"),
    ("Redis other conns", "redis_connections.other"),
    ("pub/sub: busiest node's share", "pubsub_busiest_node_share"),
    ("seconds to hold all", "seconds_to_hold_all"),
    ("orders created/s", "orders_created_per_second"),
    ("buyers at a time", "concurrency"),
    ("workers", "workers"),
    ("tickets on sale", "tickets"),
    ("orders/s (201s)", "orders_per_second"),
    ("answers/s (all codes)", "answers_per_second"),
    ("answer p50 ms", "answer_ms.50"),
    ("answer p90 ms", "answer_ms.90"),
    ("answer p99 ms", "answer_ms.99"),
    ("answer max ms", "answer_ms.100"),
    ("answered 201", "statuses.201"),
    ("answered 409", "statuses.409"),
    ("answered otherwise", "errors"),
    ("tickets sold (201 x quantity)", "ledger.sold_201"),
    ("tickets reserved in the database", "ledger.reserved"),
    ("oversold", "ledger.oversold"),
    ("held by buyers not told 201", "ledger.held_without_201"),
    ("database sessions opened", "ledger.database_sessions"),
    ("worker CPU ms / order (all workers)", "worker_cpu_ms_per_order"),
    ("load generator CPU ms / order", "client_cpu_ms_per_order"),
]


def lookup(result, dotted):
    value = result
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part if part in value else (int(part) if part.isdigit() else part))
        if value is None:
            return None
    return value


def median_of(runs, dotted):
    values = [lookup(r, dotted) for r in runs]
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not values:
        return None
    return round(statistics.median(values), 3)


def medians(all_runs):
    """{mode: {dotted key: median over runs}}."""
    out = {}
    for mode in dict.fromkeys(r["mode"] for run in all_runs for r in run):
        runs = [r for run in all_runs for r in run if r["mode"] == mode]
        out[mode] = {key: median_of(runs, key) for _, key in ROWS if median_of(runs, key) is not None}
    return out


def table(all_runs):
    columns = []  # (header, result)
    for i, run in enumerate(all_runs, 1):
        for result in run:
            columns.append((f"{result['mode']} #{i}", result))
    if len(all_runs) > 1:
        for mode, values in medians(all_runs).items():
            columns.append((f"{mode} median", {"_flat": values}))

    def cell(result, key):
        value = result["_flat"].get(key) if "_flat" in result else lookup(result, key)
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    rows = [(label, [cell(r, key) for _, r in columns]) for label, key in ROWS]
    rows = [row for row in rows if any(c != "-" for c in row[1])]
    widths = [max(len(label) for label, _ in rows)] + [
        max(len(header), *(len(cells[i]) for _, cells in rows)) for i, (header, _) in enumerate(columns)]
    lines = ["  ".join([" " * widths[0]] + [h.rjust(w) for (h, _), w in zip(columns, widths[1:])])]
    for label, cells in rows:
        lines.append("  ".join([label.ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells, widths[1:])]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--worker-pid", type=int, help="with --url: the worker's pid, for RSS, open files and Redis connections")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                        help="with --url: the Redis the server uses (for CLIENT LIST)")
    parser.add_argument("--mode", choices=("long-poll", "short-poll", "both", "callbacks", "drop"), default="long-poll")
    parser.add_argument("-n", type=int, default=1000, help="orders (and held waits) per phase")
    parser.add_argument("--rate", type=float, default=200, help="callbacks per second; 0: as fast as possible")
    parser.add_argument("--timeout", type=float, default=55, help="the wait's timeout= (the hold), seconds")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between all waits held and the first callback")
    parser.add_argument("--poll-interval", type=float, default=3.0, help="short poll: seconds between GETs")
    parser.add_argument("--create-concurrency", type=int, default=16)
    parser.add_argument("--callback-connections", type=int, default=128,
                        help="keep-alive connections the callbacks go out on (more open as needed, up to this)")
    parser.add_argument("--open-rate", type=float, default=500, help="new waits (or pollers) per second")
    parser.add_argument("--open-concurrency", type=int, default=200, help="waits being connected at once")
    parser.add_argument("--token", default="sandbox", help="PAYHERO_CALLBACK_TOKEN")
    parser.add_argument("--repeat", type=int, default=1, help="runs (each on a fresh server unless --url)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the server we start (repeatable)")
    drop = parser.add_argument_group("--mode drop (the ticket drop)")
    drop.add_argument("--concurrency", type=int, default=300, help="buyers at a time")
    drop.add_argument("--ticket-type", default="early-bird", help="the demo event's ticket type everyone buys")
    drop.add_argument("--quantity", type=int, default=1, help="tickets per order")
    drop.add_argument("--tickets", type=int, help="tickets on sale (default: quantity x buyers)")
    drop.add_argument("--phone", default=NO_CALLBACK_PHONE, help="the buyers' phone (default: the sandbox never calls back)")
    drop.add_argument("--order-timeout", type=float, default=60, help="seconds a buyer waits for the answer")
    parser.add_argument("--workers", type=int, help="gunicorn workers of the server we start (default: 2 for drop, else 1)")
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres",
                        help="the server's database (a fresh one per run)")
    parser.add_argument("--database-url", help="with --url: the server's database, for --mode drop's checks")
    parser.add_argument("--py-spy", metavar="FILE", help="profile the worker with py-spy during the load (collapsed stacks)")
    parser.add_argument("--cluster", action="store_true",
                        help="run the server on a 3-primary Redis Cluster started for the run (sharded pub/sub)")
    parser.add_argument("--classic-contrast", action="store_true",
                        help="with --cluster: then classic PUBLISH the same number of messages, for each node's share")
    parser.add_argument("--json", default="loadtest-result.json", help="where to write the results")
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    cluster = start_cluster() if args.cluster and not args.url else None
    all_runs, targets, contrast = [], [], None
    for i in range(args.repeat):
        server = None
        if args.url:
            target = {"url": args.url.rstrip("/"), "worker_pid": args.worker_pid, "redis_url": args.redis_url,
                      "worker_pids": [args.worker_pid] if args.worker_pid else [], "database_url": args.database_url}
        else:
            server, target = start_server(args, cluster.url if cluster else None)
            print(f"run {i + 1}/{args.repeat}: server {target['url']} worker pid {target['worker_pid']} log {target['log']}",
                  file=sys.stderr)
        try:
            results = asyncio.run(run_once(args, target))
        finally:
            if server is not None:
                server.stop()
        for result in results:
            print(f"run {i + 1} {result['mode']}: " + json.dumps(result), file=sys.stderr)
        all_runs.append(results)
        targets.append({k: v for k, v in target.items() if k != "log"})
    if args.classic_contrast and (cluster or args.url):
        contrast = classic_publish_contrast(cluster.url if cluster else args.redis_url, args.n, args.rate)
    if cluster:
        cluster.stop()

    print(table(all_runs))
    for label, result in [(f"{r['mode']} #{i}", r) for i, run in enumerate(all_runs, 1) for r in run] + \
            ([("classic PUBLISH", contrast)] if contrast else []):
        for node, counters in (result.get("pubsub_by_node") or {}).items():
            print(f"{label}: node {node} carried {counters['messages']} messages "
                  f"({counters['share_of_publishes']:.0%} of the publishes), {counters['net_output_bytes']} bytes out")
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "load_average_at_end": os.getloadavg()},
        "args": vars(args),
        "runs": all_runs,
        "medians": medians(all_runs),
        "classic_publish_contrast": contrast,
        "targets": targets,
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {args.json}", file=sys.stderr)
    failed = any(r.get("errors") or r.get("wrong_status") or lookup(r, "ledger.oversold")
                 or lookup(r, "ledger.held_without_201") for run in all_runs for r in run)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
