"""The one-Redis backend: pub/sub across processes.

Publishes on `order:status:<id>` and caches `order:latest:<id>` through a
Publisher (its own connection and greenlet, publisher.py), reads the cache
through a small pool of its own, and keeps ONE subscriber connection per
process (subscriber.Subscriber) that SUBSCRIBEs a channel while the process
has a waiter for it.
"""
import json
import logging

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import metrics
from .hub import CACHE_SECONDS, Hub, cached_message
from .publisher import Publisher, log_sent, redis_connection
from .subscriber import Subscriber, connection_options

log = logging.getLogger(__name__)

CACHE_POOL_SIZE = 16  # cache-read connections per process (the publisher and the subscriber are apart)


class RedisHub(Hub):
    """Redis pub/sub across processes, one subscriber connection per process."""

    def __init__(self, url, prefix="", **limits):
        super().__init__(**limits)
        self.url = url
        self.prefix = prefix
        self._client = self.cache_client(url)
        self._publisher = Publisher(lambda: redis_connection(url, "eventi-pub"))
        channel_prefix = len(f"{prefix}order:status:".encode())
        self._subscriber = Subscriber(self, connection_options(url), self.channel,
                                      lambda channel: channel[channel_prefix:].decode())

    @staticmethod
    def cache_client(url, host=None, port=None, max_connections=CACHE_POOL_SIZE):
        # One quick retry covers a pooled connection gone stale; more would hold up the wait.
        # Bounded: under gevent every concurrent cache read would otherwise open its own
        # connection (a burst of thousands of waits arriving meant hundreds of sockets); past the
        # bound a reader waits for a free connection, up to 2 s, then fails as a Redis error does
        # (and reads the database instead).  Publishing never uses this pool.
        pool = redis.BlockingConnectionPool(
            **connection_options(url, host, port), max_connections=max_connections, timeout=2, socket_timeout=2,
            socket_connect_timeout=1,
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
        return cached_message(raw)

    def publish(self, message, quiet=False):
        # Not gated on the subscriber being connected: Redis may be back before it is, and the
        # Publisher itself stops trying for a moment after a failed round trip.
        payload = json.dumps(message, separators=(",", ":"))
        # Cache first: a waiter subscribing between the two still finds it.
        replies = self._publisher.publish((("SET", self.cache_key(message["id"]), payload, "EX", CACHE_SECONDS),
                                           ("PUBLISH", self.channel(message["id"]), payload)))
        if not quiet:
            log_sent(replies)

    def ready(self):
        try:
            self._client.ping()
        except (redis.RedisError, OSError) as exc:
            return False, f"redis: {exc}"
        return True, "redis"

    # -- subscribing: one Subscriber, whose greenlet alone uses the connection --

    @property
    def connected(self):
        return self._subscriber.connected

    @property
    def ping_interval(self):
        return self._subscriber.ping_interval

    @ping_interval.setter
    def ping_interval(self, seconds):
        self._subscriber.ping_interval = seconds

    @property
    def _listener(self):
        return self._subscriber.greenlet

    def _ensure_subscribed(self, order_id):
        if self.connected is False:
            return  # degraded: the re-check every few seconds stands in for messages
        self._subscriber.confirm(order_id)

    def _release(self, order_id):
        self._subscriber.release(order_id)

    def _start_background(self):
        super()._start_background()
        self._subscriber.start()

    def stop(self):
        super().stop()
        self._publisher.stop()
        self._subscriber.stop()

    # -- what the Subscriber asks of its owner --

    def _wanted(self, subscriber, order_id):
        return bool(self._waiters.get(order_id))

    def _held_by(self, subscriber):
        return list(self._waiters)

    def _on_subscriber_down(self, subscriber, exc):
        self._recheck_now.set()

    def _on_subscriber_up(self, subscriber):
        self._publisher.resume()

    def _on_subscriptions_lost(self, subscriber, order_ids, reason):
        log.warning("Redis dropped %d subscriptions (%s); re-checking the database", len(order_ids), reason)
        self._recheck_now.set()

    def _count_channels(self):
        metrics.subscribed_channels.set(self._subscriber.channels)
