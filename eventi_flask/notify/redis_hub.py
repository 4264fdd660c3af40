"""The one-Redis backend: pub/sub across processes.

Publishes on `order:status:<id>` and caches `order:latest:<id>` through a
Publisher (its own connection and greenlet, publisher.py), reads the cache
through a small pool of its own, and keeps ONE subscriber connection per
process, owned by one listener greenlet, that SUBSCRIBEs a channel while the
process has a waiter for it.
"""
import collections
import errno
import json
import logging
import os
import random
import time

import gevent
import gevent.event
import gevent.select
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import metrics
from .hub import CACHE_SECONDS, Hub, is_order_message
from .publisher import Publisher, redis_connection

log = logging.getLogger(__name__)

SUBSCRIBE_CONFIRM_TIMEOUT = 2.0  # past this, the waiter goes on and the re-check covers it
SUBSCRIBE_BATCH = 1000
CACHE_POOL_SIZE = 16  # cache-read connections per process (the publisher and the subscriber are apart)


class RedisHub(Hub):
    """Redis pub/sub across processes, one subscriber connection per process."""

    def __init__(self, url, prefix="", **limits):
        super().__init__(**limits)
        self.url = url
        self.prefix = prefix
        self._channel_prefix = f"{prefix}order:status:".encode()
        self._client = self.cache_client(url)
        self._publisher = Publisher(lambda: redis_connection(url, "eventi-pub"))
        self.connected = None  # None until the listener's first attempt: waiters still wait for it
        self.ping_interval = 5.0
        self._listener = None
        self._wake_r = self._wake_w = None
        # Subscription bookkeeping, touched only by the listener and (for _want/_ready) watch():
        self._requested = set()  # channels whose last command sent was SUBSCRIBE
        self._ready = {}  # id -> Event set when the SUBSCRIBE covering new waiters is confirmed
        self._inflight = {}  # id -> deque of Events (SUBSCRIBE) / None (UNSUBSCRIBE) awaiting replies
        self._want = set()
        self._drop = set()
        self._recheck_when_resubscribed = False

    @staticmethod
    def cache_client(url):
        # One quick retry covers a pooled connection gone stale; more would hold up the wait.
        # Bounded: under gevent every concurrent cache read would otherwise open its own
        # connection (a burst of thousands of waits arriving meant hundreds of sockets); past the
        # bound a reader waits for a free connection, up to 2 s, then fails as a Redis error does
        # (and reads the database instead).  Publishing never uses this pool.
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=CACHE_POOL_SIZE, timeout=2, socket_timeout=2, socket_connect_timeout=1,
            health_check_interval=15, retry=Retry(NoBackoff(), 1))
        return redis.Redis(connection_pool=pool)

    def channel(self, order_id):
        return f"{self.prefix}order:status:{order_id}"

    def cache_key(self, order_id):
        return f"{self.prefix}order:latest:{order_id}"

    # -- the cache: a small pool; publishing: the Publisher's own connection --

    def latest(self, order_id):
        if self.connected is False:
            return None  # Redis is away: don't make every new wait pay a timeout; the database answers
        try:
            raw = self._client.get(self.cache_key(order_id))
        except (redis.RedisError, OSError):
            return None
        return json.loads(raw) if raw else None

    def publish(self, message):
        if self.connected is False:
            # Redis is known to be away: don't queue for it. Waiters everywhere are re-checking the database.
            metrics.publish_failures.inc()
            return
        payload = json.dumps(message, separators=(",", ":"))
        # Cache first: a waiter subscribing between the two still finds it.
        self._publisher.publish((("SET", self.cache_key(message["id"]), payload, "EX", CACHE_SECONDS),
                                ("PUBLISH", self.channel(message["id"]), payload)))

    def ready(self):
        try:
            self._client.ping()
        except (redis.RedisError, OSError) as exc:
            return False, f"redis: {exc}"
        return True, "redis"

    # -- subscribing: the waiter side --

    def _ensure_subscribed(self, order_id):
        if self.connected is False:
            return  # degraded: the re-check every few seconds stands in for messages
        if order_id in self._requested:
            ready = self._ready.get(order_id)
            if ready is None or ready.is_set():
                return
        else:
            ready = self._ready.get(order_id)
            if ready is None:
                ready = self._ready[order_id] = gevent.event.Event()
            self._want.add(order_id)
            self._wake_listener()
        ready.wait(SUBSCRIBE_CONFIRM_TIMEOUT)

    def _release(self, order_id):
        self._drop.add(order_id)
        self._wake_listener()

    def _start_background(self):
        super()._start_background()
        if self._listener is None:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._listener = gevent.spawn(self._listen_forever)

    def _greenlets(self):
        return super()._greenlets() + [g for g in (self._listener,) if g is not None]

    def stop(self):
        super().stop()
        self._publisher.stop()

    def _wake_listener(self):
        if self._wake_w is None:
            return
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    # -- the listener greenlet: the only user of the subscriber connection --

    def _listen_forever(self):
        backoff = 0.25
        while True:
            conn = None
            try:
                conn = self._connect()
                backoff = 0.25
                self._serve(conn)
            except Exception as exc:  # the listener must outlive anything, or the worker goes deaf
                if not isinstance(exc, (redis.RedisError, OSError)):
                    log.exception("Redis listener failed; reconnecting")
                if self.connected is not False:
                    self._on_disconnected(exc)
                else:
                    log.debug("Redis subscriber still unreachable: %s", exc)
            finally:
                if conn is not None:
                    conn.disconnect()
            gevent.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 10.0)

    def _connect(self):
        pool = redis.ConnectionPool.from_url(
            self.url, protocol=2, socket_connect_timeout=1, socket_keepalive=True,
            client_name=f"eventi-sub-{os.getpid()}",
        )  # RESP2: pub/sub messages arrive as plain replies, not RESP3 pushes
        conn = pool.make_connection()
        conn.connect()
        # A fresh connection has no subscriptions: re-request every channel we hold
        # waiters for, keeping the confirmations that new waiters still wait on.
        self._ready = {order_id: ready for order_id, ready in self._ready.items() if not ready.is_set()}
        self._requested.clear()
        self._inflight.clear()
        self._drop.clear()
        self._want = set(self._waiters)
        # Messages may have been missed while we were away: once resubscribed, re-check everyone.
        self._recheck_when_resubscribed = bool(self._want)
        self.connected = True
        metrics.listener_connected.set(1)
        metrics.subscribed_channels.set(0)
        metrics.redis_transitions.labels("connected").inc()
        log.info("Redis subscriber connected")
        return conn

    def _on_disconnected(self, exc):
        self.connected = False
        metrics.listener_connected.set(0)
        metrics.redis_transitions.labels("disconnected").inc()
        log.warning("Redis subscriber disconnected, re-checking the database every %gs until it is back: %s",
                    self.degraded_interval, exc)
        for ready in self._ready.values():
            ready.set()  # nobody waits for a confirmation that cannot come
        self._recheck_now.set()

    def _serve(self, conn):
        sock = conn._sock  # redis-py keeps it private; we only select() on it
        ping_sent = None
        while True:
            self._sync_subscriptions(conn)
            while conn.can_read(timeout=0):
                self._handle(conn.read_response())
                ping_sent = None
            timeout = self.ping_interval if ping_sent is None else max(0, ping_sent + self.ping_interval - time.monotonic())
            readable, _, _ = gevent.select.select([sock, self._wake_r], [], [], timeout)
            if self._wake_r in readable:
                self._drain_wake_pipe()
            if not readable:
                if ping_sent is not None:
                    raise redis.ConnectionError(f"no PONG from Redis within {self.ping_interval:g}s")
                conn.send_command("PING")
                ping_sent = time.monotonic()

    def _drain_wake_pipe(self):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise

    def _sync_subscriptions(self, conn):
        subscribe, unsubscribe = [], []
        for order_id in self._want:
            if self._waiters.get(order_id) and order_id not in self._requested:
                ready = self._ready.setdefault(order_id, gevent.event.Event())
                self._inflight.setdefault(order_id, collections.deque()).append(ready)
                self._requested.add(order_id)
                subscribe.append(self.channel(order_id))
            elif not self._waiters.get(order_id):
                ready = self._ready.pop(order_id, None)
                if ready is not None and order_id not in self._requested:
                    ready.set()
        self._want.clear()
        for order_id in self._drop:
            if not self._waiters.get(order_id) and order_id in self._requested:
                self._requested.discard(order_id)
                self._ready.pop(order_id, None)
                self._inflight.setdefault(order_id, collections.deque()).append(None)
                unsubscribe.append(self.channel(order_id))
        self._drop.clear()
        for command, channels in (("SUBSCRIBE", subscribe), ("UNSUBSCRIBE", unsubscribe)):
            for start in range(0, len(channels), SUBSCRIBE_BATCH):
                conn.send_command(command, *channels[start:start + SUBSCRIBE_BATCH])

    def _handle(self, reply):
        kind = reply[0]
        if kind == b"message":
            self._on_message(reply[1], reply[2])
        elif kind in (b"subscribe", b"unsubscribe"):
            order_id = reply[1][len(self._channel_prefix):].decode()
            queue = self._inflight.get(order_id)
            ready = queue.popleft() if queue else None
            if queue is not None and not queue:
                del self._inflight[order_id]
            metrics.subscribed_channels.set(reply[2])
            if ready is not None:
                ready.set()
                log.info("Subscribed to Redis channel: %s", reply[1].decode())
            if self._recheck_when_resubscribed and not self._inflight:
                self._recheck_when_resubscribed = False
                self._recheck_now.set()

    def _on_message(self, channel, data):
        order_id = channel[len(self._channel_prefix):].decode()
        log.info("Redis message received for order: %s", order_id)
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if not is_order_message(message):
            # Not one of ours (another publisher on a shared channel?): the database decides.
            log.warning("A message on %s is not an order message; re-checking the database", channel.decode())
            for waiter in list(self._waiters.get(order_id, ())):
                waiter.ask_recheck()
            return
        self._deliver(order_id, message)
