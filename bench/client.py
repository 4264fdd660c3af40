"""The load generator's HTTP/1.1 client: one asyncio loop, plain sockets, no thread per request.

A simulated phone is a `Conn` of its own (as a browser tab has its own
connection); order creation and callbacks that stand for many senders share a
keep-alive `Pool`.  Times are stamped by this process: what a customer sees.
"""
import asyncio
import json

ORDER_BODY = {"event": "test-this-end-to-end", "ticket_type": "early-bird", "quantity": 1,
              "name": "Load Test", "email": "load@example.com"}
NO_CALLBACK_PHONE = "0708000004"  # the sandbox never calls back: the load test posts the callback itself


class HttpError(Exception):
    pass


class Answer:
    """One HTTP answer: status, headers (lower-case names), body bytes."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def retry_after(self, default=1.0):
        try:
            return float(self.headers.get("retry-after", default))
        except ValueError:
            return default


class Conn:
    """One keep-alive HTTP/1.1 connection.  Requests on it run one at a time."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    @property
    def is_open(self):
        return self.writer is not None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    def send(self, method, path, body=None, headers=None):
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))

    async def receive(self):
        """The next answer; closes the connection if the server asked to."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            self.close()
            raise HttpError(f"connection lost: {exc!r}") from None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.lower()] = value.strip()
        length = int(headers.get("content-length", 0))
        try:
            body = await self.reader.readexactly(length) if length else b""
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.close()
            raise HttpError(f"connection lost in the body: {exc!r}") from None
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Answer(status, headers, body)

    async def request(self, method, path, body=None, headers=None):
        """Send and receive, (re)opening the connection first when the server has closed it."""
        if not self.is_open:
            await self.open()
        self.send(method, path, body, headers)
        return await self.receive()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Pool:
    """Keep-alive connections shared by many senders, opened on demand up to `size`."""

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
                reused = conn.is_open
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


async def create_orders(pool, n, concurrency, phone=NO_CALLBACK_PHONE):
    """n orders made over the pool, `concurrency` at a time (a shed one asked again); (orders, orders per second)."""
    body = json.dumps({**ORDER_BODY, "phone": phone}).encode()
    orders, errors = [], []
    left = [n]

    async def creator():
        while left[0] > 0:
            left[0] -= 1
            try:
                answer = await pool.request("POST", "/api/orders", body)
            except (OSError, HttpError) as exc:
                errors.append(repr(exc))
                continue
            if answer.status in (429, 503) and answer.headers.get("retry-after"):
                left[0] += 1  # shed (a busy machine): ask again when told to, as the checkout page does
                await asyncio.sleep(answer.retry_after())
                continue
            if answer.status != 201:
                errors.append(f"{answer.status} {answer.body[:200]!r}")
                continue
            orders.append(answer.json())

    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(*(creator() for _ in range(concurrency)))
    if errors:
        raise SystemExit(f"creating orders failed {len(errors)} times, first: {errors[0]}")
    return orders, n / (loop.time() - started)


async def paced(rate, coroutines):
    """Start the coroutines at `rate` per second, open loop (arrivals do not wait for answers); the tasks."""
    loop = asyncio.get_running_loop()
    started, tasks = loop.time(), []
    for i, coroutine in enumerate(coroutines):
        delay = started + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(coroutine))
    return tasks


def wait_path(order_id, version, timeout):
    return f"/api/orders/{order_id}/wait?timeout={timeout:g}&since={version}"


async def post_order(conn, body, headers=None, timeout=60):
    """One POST /api/orders on a buyer's own connection: (the answer or None, its status or error name, ms)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        answer = await asyncio.wait_for(conn.request("POST", "/api/orders", body, headers), timeout)
    except (OSError, HttpError, asyncio.TimeoutError) as exc:
        conn.close()
        return None, type(exc).__name__, (loop.time() - started) * 1000
    return answer, answer.status, (loop.time() - started) * 1000
