"""The waiter registry every notification backend shares.

A held /wait registers a Waiter here and blocks on its gevent Event; a
backend sets it when the order changes.  The backends, one file each:

* local_hub.LocalHub: in-process, for a single worker without REDIS_URL.
* redis_hub.RedisHub: one Redis; publishes on `order:status:<id>` and keeps ONE
  subscriber connection per process.
* cluster_hub.ClusterHub: a Redis Cluster; sharded pub/sub on `order:{<id>}:status`,
  at most one subscriber connection per primary per process.

Both Redis backends run their connections through subscriber.Subscriber.

A waiter never touches a socket.  The database stays the truth: a background
re-check reads order versions in one batched query every WAIT_RECHECK_INTERVAL
seconds (every WAIT_RECHECK_INTERVAL_DEGRADED while Redis, or a cluster primary, is unreachable), so
a lost message costs latency, never the answer.
"""
import json
import logging

import gevent
import gevent.event

from .. import metrics
from . import departure

log = logging.getLogger(__name__)

CACHE_SECONDS = 60  # how long the latest message of an order stays cached
LINE_CHANNEL_PREFIX = "line."  # line/service.tick_channel: one event's line, not an order


class WaitLimitReached(Exception):
    """Too many held waits: `scope` is "order" or "worker"."""

    def __init__(self, scope):
        super().__init__(scope)
        self.scope = scope


class Waiter:
    """One held request.  Woken with a message (an order change), a request to re-check, or its client leaving."""

    __slots__ = ("order_id", "seen_version", "message", "recheck", "client_left", "wants", "_event", "_client_watcher",
                 "_owner")

    def __init__(self, order_id):
        self.order_id = order_id
        # wants(message) -> bool, or None for every message: asked by the delivering loop itself, so that a
        # message this waiter would only read and go back to sleep on costs no switch to its greenlet.
        self.wants = None
        self.seen_version = None
        self.message = None
        self.recheck = False
        self.client_left = False
        self._event = gevent.event.Event()
        self._client_watcher = None
        self._owner = None

    def watch_client(self, sock, hub):
        """Also wake, with client_left set, when the client closes this socket; `hub` lets go of it first.

        One libev watcher on the socket's readability (departure.py): nothing runs while
        nothing happens, and it costs the collector two objects (the watcher, its callback).
        """
        try:
            fd = sock.fileno()
        except OSError:
            return
        if fd < 0:
            return
        self._owner = hub
        self._client_watcher = gevent.get_hub().loop.io(fd, 1)  # 1: readable
        self._client_watcher.start(self._client_readable)  # no arguments: no tuple to track

    def _client_readable(self):
        # Run by the event loop itself: must not block (client_state does not).
        state = departure.client_state(self._client_watcher.fd)
        if state == departure.STAYING:
            return
        self.stop_watching_client()  # left, or sent more: either way the socket would stay readable
        if state == departure.LEFT:
            self.client_left = True
            self._owner.release_departed(self)  # let go now, not when the request's greenlet next runs
            self._event.set()

    def stop_watching_client(self):
        watcher, self._client_watcher = self._client_watcher, None
        if watcher is not None:
            watcher.stop()
            watcher.close()

    def deliver(self, message):
        if self.wants is not None and not self.wants(message):
            return
        if self.message is None or message["version"] > self.message["version"]:
            self.message = message
        self._event.set()

    def ask_recheck(self):
        self.recheck = True
        self._event.set()

    def wait(self, timeout):
        """Block until woken or `timeout` passes; return (message or None, recheck)."""
        self._event.wait(timeout)
        self._event.clear()
        message, recheck = self.message, self.recheck
        self.message, self.recheck = None, False
        return message, recheck


class Hub:
    """What both hubs share: the waiter registry, limits and the safety re-check."""

    def __init__(self, max_per_order, max_per_worker, recheck_interval, degraded_interval):
        self.max_per_order = max_per_order
        self.max_per_worker = max_per_worker
        self.recheck_interval = recheck_interval
        self.degraded_interval = degraded_interval
        self._waiters = {}  # order id -> set of Waiters
        self._count = 0
        self._version_source = None
        self._recheck_now = gevent.event.Event()  # set: re-check every held order now
        self._recheck_some = set()  # orders to re-check with the next pass (recheck_orders)
        self._recheck_some_now = gevent.event.Event()
        self._poller = None

    # -- the interface the wait route and the service layer use --

    connected = True

    def set_version_source(self, fetch_versions):
        """fetch_versions(ids) -> {id: version}, one batched database read."""
        self._version_source = fetch_versions

    def watch(self, order_id, client=None, shared=False):
        """Register a waiter; return it once a change to the order can no longer be missed.

        `client`: the request's socket, if the server gives it (departure.client_socket):
        the waiter then also wakes when its client leaves.  `shared`: a channel every waiter of a
        line listens to (line/service.py), not one order's: no per-order limit.
        """
        waiters = self._waiters.get(order_id)
        if self._count >= self.max_per_worker:
            metrics.wait_rejected.labels("worker").inc()
            raise WaitLimitReached("worker")
        if waiters and not shared and len(waiters) >= self.max_per_order:
            metrics.wait_rejected.labels("order").inc()
            raise WaitLimitReached("order")
        self._start_background()
        waiter = Waiter(order_id)
        if waiters is None:
            waiters = self._waiters[order_id] = set()
        waiters.add(waiter)
        self._count += 1
        metrics.waiters.inc()
        if client is not None:
            waiter.watch_client(client, self)
        try:
            self._ensure_subscribed(order_id)
        except BaseException:
            self.unwatch(waiter)
            raise
        return waiter

    def unwatch(self, waiter):
        waiter.stop_watching_client()
        waiters = self._waiters.get(waiter.order_id)
        if not waiters or waiter not in waiters:
            return
        waiters.discard(waiter)
        self._count -= 1
        metrics.waiters.dec()
        if not waiters:
            del self._waiters[waiter.order_id]
            self._release(waiter.order_id)

    def release_departed(self, waiter):
        """The waiter's client closed its connection: let go of it (called from the event loop)."""
        metrics.waits_departed.inc()
        self.unwatch(waiter)

    @property
    def waiter_count(self):
        return self._count

    def recheck_orders(self, order_ids):
        """Re-check these orders (only) against the database: gathered into the next pass's one query, their
        waiters woken if they changed (10,000 subscriptions confirmed late make a few queries, not 10,000 reads)."""
        self._recheck_some.update(order_ids)
        self._recheck_some_now.set()  # the re-check greenlet runs: it started with the first waiter

    def wake_all(self):
        """Ask every waiter to re-read its order (or, shutting down, to answer with what it has)."""
        for waiters in list(self._waiters.values()):
            for waiter in list(waiters):
                waiter.ask_recheck()

    shutting_down = False

    def shut_down(self):
        """The worker is stopping (SIGTERM): every wait, held or new, answers now (503 shutting_down
        unless its order has just changed), and the page asks again elsewhere."""
        self.shutting_down = True
        log.info("Shutting down: answering %d held waits at once", self._count)
        self.wake_all()

    def latest(self, order_id):
        """The last published message for this order if still cached, else None."""
        raise NotImplementedError

    def publish(self, message, quiet=False):
        """Tell every process that an order changed.  Called after the commit; never raises.

        `quiet`: no "Redis notification sent" line (the line's once-a-second tick is no event to log)."""
        raise NotImplementedError

    def ready(self):
        """(ok, detail) for /readyz."""
        return True, "in-process"

    def stop(self):
        for greenlet in self._greenlets():
            greenlet.kill(block=False)

    # -- for subclasses --

    def _ensure_subscribed(self, order_id):
        pass

    def _release(self, order_id):
        pass

    def _on_message(self, order_id, data):
        """A message on the order's channel (the Redis backends): deliver it if it is one of ours."""
        if not order_id.startswith(LINE_CHANNEL_PREFIX):  # a line's tick, every second: not logged each time
            log.info("Redis message received for order: %s", order_id)
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if not is_order_message(message):
            # Not one of ours (another publisher on a shared channel?): the database decides.
            log.warning("A message on %s is not an order message; re-checking the database", self.channel(order_id))
            for waiter in list(self._waiters.get(order_id, ())):
                waiter.ask_recheck()
            return
        self._deliver(order_id, message)

    def _deliver(self, order_id, message):
        for waiter in list(self._waiters.get(order_id, ())):
            waiter.deliver(message)

    def _greenlets(self):
        return [g for g in (self._poller,) if g is not None]

    def _start_background(self):
        if self._poller is None:
            self._poller = gevent.spawn(self._recheck_forever)

    def _recheck_forever(self):
        while True:
            interval = self.recheck_interval if self.connected else self.degraded_interval
            gevent.wait([self._recheck_now, self._recheck_some_now], timeout=interval, count=1)
            every = self._recheck_now.is_set() or not self._recheck_some_now.is_set()  # asked to, or it is time
            self._recheck_now.clear()
            self._recheck_some_now.clear()
            some, self._recheck_some = self._recheck_some, set()
            try:
                self._recheck_once(None if every else some)
            except Exception:
                log.exception("Re-checking held orders against the database failed")

    def _recheck_once(self, only=None):
        ids = list(self._waiters) if only is None else [order_id for order_id in only if order_id in self._waiters]
        if not ids or self._version_source is None:
            return
        versions = self._version_source(ids)
        for order_id in ids:
            version = versions.get(order_id)
            for waiter in list(self._waiters.get(order_id, ())):
                if version is not None and (waiter.seen_version is None or version > waiter.seen_version):
                    waiter.ask_recheck()


def cached_message(raw):
    """The order message cached under `order:latest:<id>`, or None for nothing, or anything not ours."""
    if not raw:
        return None
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    return message if is_order_message(message) else None


def is_order_message(message):
    """The message our publish() sends: carrying the whole order, with its version, both integers."""
    if not isinstance(message, dict) or not isinstance(message.get("order"), dict):
        return False
    version = message.get("version")
    published = message.get("published_at_ms")
    return (isinstance(version, int) and not isinstance(version, bool) and message["order"].get("version") == version
            and isinstance(published, (int, float)) and not isinstance(published, bool))
