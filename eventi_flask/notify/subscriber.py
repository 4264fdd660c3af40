"""One pub/sub connection, and the one greenlet that uses it.

Both Redis backends subscribe through this: the one-Redis hub with one
Subscriber per process, the cluster hub with one per primary.  The greenlet
drives a raw redis-py Connection: it sends (S)SUBSCRIBE and
(S)UNSUBSCRIBE as the owning hub gains and loses waiters, pings an idle
server, and hands each message to the hub.  Nothing else touches the socket.

redis-py's PubSub and ClusterPubSub are not used: they cannot tell an
unsubscribe we asked for from one the server sends on its own (a cluster node
that loses a slot drops its channels that way), and they resubscribe without
saying so.  Here every reply is matched to the command it answers.

No select() here: the real select() takes no descriptor above 1,023, and a worker holding
more than about 1,000 connections hands the subscriber one past that (gevent.select.select
calls it first and fails with "filedescriptor out of range").  The greenlet waits on one
gevent Event instead, set by an event-loop watcher on the socket's readability (as gevent's
own sockets wait, whatever the descriptor's number) and by the hub asking for a (un)subscribe.

The owner (a hub) provides:
  _wanted(subscriber, order_id) -> bool   the channel should be subscribed here now
  _held_by(subscriber) -> ids             what to subscribe on a fresh connection
  _on_message(order_id, data)             a message arrived
  _on_subscriber_down(subscriber, exc)    the connection is lost (it reconnects by itself)
  _on_subscriber_up(subscriber)           connected again: that Redis answers
  _on_subscriptions_lost(subscriber, ids, reason)   the server dropped or refused channels
  _count_channels()                       the subscribed channel counts changed
  _recheck_now                            an Event: set it to re-check every waiter
  recheck_orders(ids)                     have those orders' waiters read them again
  degraded_interval                       seconds between re-checks while disconnected (for the log)
"""
import collections
import logging
import os
import random
import time

import gevent
import gevent.event
import redis
from redis.connection import parse_url

from .. import metrics

log = logging.getLogger(__name__)

SUBSCRIBE_CONFIRM_TIMEOUT = 2.0  # past this, the waiter goes on and the re-check covers it
SUBSCRIBE_BATCH = 1000
STEADY_AFTER = 10.0  # a connection that served this long was fine: its failure starts a new story


class Command:
    """A command sent on the subscriber connection, waiting for its replies."""

    __slots__ = ("kind", "ids", "remaining")

    def __init__(self, kind, ids):
        self.kind = kind  # "subscribe", "unsubscribe" or "ping"
        self.ids = ids  # order id -> Event set on confirmation (subscribe) or None
        self.remaining = max(len(ids), 1)  # one reply per channel; PING has one


def chunks(ids):
    """Commands of at most SUBSCRIBE_BATCH channels each."""
    ids = list(ids)
    for start in range(0, len(ids), SUBSCRIBE_BATCH):
        yield ids[start:start + SUBSCRIBE_BATCH]


def connection_options(url, host=None, port=None):
    """redis-py connection arguments for `url`, optionally aimed at another node with the same credentials and TLS."""
    options = parse_url(url)
    if host is not None:
        options.update(host=host, port=port)
    return options


def short_lived_client(url, host=None, port=None):
    """A client for a command or two (use it in a `with`), with the URL's credentials and TLS."""
    options = connection_options(url, host, port)  # with rediss://, a connection_class: for a pool, not Redis()
    return redis.Redis.from_pool(redis.ConnectionPool(**{**options, "socket_connect_timeout": 1, "socket_timeout": 2}))


class Subscriber:
    """One subscriber connection to one Redis server (or cluster primary)."""

    def __init__(self, owner, options, channel, order_id_of, *, sharded=False, node=None, batches=chunks,
                 ping_interval=5.0):
        self.owner = owner
        self.options = options
        self.channel = channel  # order id -> channel name
        self.order_id_of = order_id_of  # channel name (bytes) -> order id
        self.node = node or f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"
        self.where = f" on {node}" if node else ""  # log lines name the node only in cluster mode
        self.batches = batches
        self.ping_interval = ping_interval
        s = "s" if sharded else ""  # sharded pub/sub: SSUBSCRIBE, SUNSUBSCRIBE, and smessage replies
        self._commands = {"subscribe": f"{s}SUBSCRIBE".upper(), "unsubscribe": f"{s}UNSUBSCRIBE".upper()}
        self._kinds = {f"{s}subscribe".encode(): "subscribe", f"{s}unsubscribe".encode(): "unsubscribe"}
        self._message_kind = f"{s}message".encode()
        self.connected = None  # None until the first attempt: new waiters still wait for it
        self.channels = 0  # as the server last counted them
        self.greenlet = None
        self._stirred = gevent.event.Event()  # the socket is readable, or the hub asked for something
        self._failures = RepeatedFailures(self.where)
        # Touched by the greenlet, and (_want, _drop, _ready) by the hub's watch/unwatch:
        self._requested = set()  # ids whose last command sent was SUBSCRIBE
        self._ready = {}  # id -> Event set when the SUBSCRIBE covering new waiters is confirmed
        self._sent = collections.deque()  # Commands awaiting replies, oldest first
        self._want = set()
        self._drop = set()
        self._resubscribing = False  # True from a (re)connect until its SUBSCRIBEs are answered
        self._reconnected = False
        self._late = set()  # ids whose waiter stopped waiting for the confirmation

    # -- the hub's side --

    def subscribe(self, order_id):
        """Ask for the channel; return an Event set once it is confirmed, or None if it already is."""
        if order_id in self._requested:
            ready = self._ready.get(order_id)
            return ready if ready is not None and not ready.is_set() else None
        ready = self._ready.get(order_id)
        if ready is None:
            ready = self._ready[order_id] = gevent.event.Event()
        self._want.add(order_id)
        self._wake()
        return ready

    def confirm(self, order_id):
        """Subscribe the channel; wait, up to SUBSCRIBE_CONFIRM_TIMEOUT, until the server confirms it.

        A waiter that gives up reads on regardless: when the confirmation does come, that order's
        waiters read it again, so a change committed in between is not missed.
        """
        ready = self.subscribe(order_id)
        if ready is not None and not ready.wait(SUBSCRIBE_CONFIRM_TIMEOUT):
            self._late.add(order_id)

    def resubscribe(self, order_id):
        """Subscribe a channel that was lost or lived elsewhere; its order is re-checked once confirmed."""
        self.subscribe(order_id)
        self._late.add(order_id)

    def release(self, order_id):
        """Unsubscribe the channel unless it is wanted again by the time the greenlet gets to it."""
        self._drop.add(order_id)
        self._wake()

    def forget(self, order_id):
        """The channel lives elsewhere now: stop asking for it here, unsubscribing it if it is."""
        self._want.discard(order_id)
        self.release(order_id)

    def start(self):
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self._listen_forever)

    def stop(self):
        if self.greenlet is not None:
            self.greenlet.kill()
            self.greenlet = None

    def _wake(self):
        self._stirred.set()

    # -- the greenlet: the only user of the connection --

    def _listen_forever(self):
        backoff = 0.25
        while True:
            conn = None
            started = time.monotonic()
            try:
                conn = self._connect()
                self._serve(conn)
            except Exception as exc:  # the listener must outlive anything, or the worker goes deaf
                if time.monotonic() - started >= STEADY_AFTER:
                    backoff = 0.25  # it served a while: reconnect soon; one failing at once waits longer
                    self._failures.over()
                first = self._failures.failed(exc)
                if first and not isinstance(exc, (redis.RedisError, OSError)):
                    log.exception("Redis listener%s failed; reconnecting", self.where)
                if self.connected is not False:
                    self._on_disconnected(exc, say=first)
                elif first:
                    log.debug("Redis subscriber%s still unreachable: %s", self.where, exc)
            finally:
                if conn is not None:
                    conn.disconnect()
            gevent.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 10.0)

    def _connect(self):
        # RESP2: pub/sub messages arrive as plain replies, not RESP3 pushes.
        # socket_timeout: the handshake (TLS, CLIENT SETNAME) and a reply cut off halfway must not hang the
        # listener; replies are read only once the socket is readable, so a quiet channel never meets it.
        pool = redis.ConnectionPool(**{**self.options, "protocol": 2, "socket_connect_timeout": 1,
                                       "socket_timeout": self.ping_interval, "socket_keepalive": True,
                                       "client_name": f"eventi-sub-{os.getpid()}"})
        conn = pool.make_connection()
        conn.connect()
        # A fresh connection has no subscriptions: re-request every channel we hold
        # waiters for, keeping the confirmations that new waiters still wait on.
        self._ready = {order_id: ready for order_id, ready in self._ready.items() if not ready.is_set()}
        self._requested.clear()
        self._sent.clear()
        self._drop.clear()
        self._late.clear()  # the re-check after resubscribing covers them
        self._want = set(self.owner._held_by(self))
        self._resubscribing = bool(self._want)
        self._reconnected = self.connected is False
        self.connected = True
        self.channels = 0
        metrics.listener_connected.labels(self.node).set(1)
        metrics.redis_transitions.labels("connected").inc()
        self.owner._count_channels()
        self.owner._on_subscriber_up(self)
        log.info("Redis subscriber connected%s", self.where)
        return conn

    def _on_disconnected(self, exc, say=True):
        self.connected = False
        self.channels = 0
        metrics.listener_connected.labels(self.node).set(0)
        metrics.redis_transitions.labels("disconnected").inc()
        self.owner._count_channels()
        if say:
            log.warning("Redis subscriber%s disconnected, re-checking the database every %gs until it is back: %s",
                        self.where, self.owner.degraded_interval, exc)
        for ready in self._ready.values():
            ready.set()  # nobody waits for a confirmation that cannot come
        self.owner._on_subscriber_down(self, exc)

    def _serve(self, conn):
        # redis-py keeps the socket private; we only watch its descriptor, through the event loop.
        readable = gevent.get_hub().loop.io(conn._sock.fileno(), 1)  # 1: readable
        readable.start(self._stirred.set)  # run by the loop, on every turn the socket has data
        try:
            self._stirred.set()  # a first pass: the hub may have asked before we were connected
            ping_sent = None
            steady_at = time.monotonic() + STEADY_AFTER
            while True:
                if steady_at is not None and time.monotonic() >= steady_at:
                    self._failures.over()  # say how often it failed before this connection held
                    steady_at = None
                timeout = self.ping_interval if ping_sent is None else max(0, ping_sent + self.ping_interval - time.monotonic())
                # A busy loop may run the timer and the socket's watcher in one turn: a reply already
                # in hand is no timeout (and no reconnect of thousands of channels).
                if not self._stirred.wait(timeout) and not conn.can_read(timeout=0):
                    if ping_sent is not None:
                        raise redis.ConnectionError(f"no PONG from Redis{self.where} within {self.ping_interval:g}s")
                    conn.send_command("PING")
                    self._sent.append(Command("ping", {}))
                    ping_sent = time.monotonic()
                    continue
                self._stirred.clear()  # before the work: what arrives meanwhile sets it again
                self._sync(conn)
                while conn.can_read(timeout=0):
                    self._read(conn)
                    ping_sent = None
        finally:
            readable.stop()  # before conn.disconnect() closes the descriptor under it
            readable.close()

    def _sync(self, conn):
        """Send what watch/unwatch asked for since the last pass, batched."""
        subscribe, unsubscribe = {}, {}
        for order_id in self._want:
            if self.owner._wanted(self, order_id) and order_id not in self._requested:
                subscribe[order_id] = self._ready.setdefault(order_id, gevent.event.Event())
                self._requested.add(order_id)
            elif not self.owner._wanted(self, order_id):
                ready = self._ready.pop(order_id, None)
                if ready is not None and order_id not in self._requested:
                    ready.set()
        self._want.clear()
        for order_id in self._drop:
            if not self.owner._wanted(self, order_id) and order_id in self._requested:
                self._requested.discard(order_id)
                self._ready.pop(order_id, None)
                unsubscribe[order_id] = None
        self._drop.clear()
        for kind, ids in (("subscribe", subscribe), ("unsubscribe", unsubscribe)):
            for batch in self.batches(ids):
                conn.send_command(self._commands[kind], *(self.channel(order_id) for order_id in batch))
                self._sent.append(Command(kind, {order_id: ids[order_id] for order_id in batch}))

    def _read(self, conn):
        try:
            reply = conn.read_response()
        except redis.ResponseError as exc:  # an error answers a whole command
            self._on_refused(exc)
            return
        if isinstance(reply, bytes) or reply[0] == b"pong":  # PONG, outside or inside subscribed mode
            if self._sent and self._sent[0].kind == "ping":
                self._sent.popleft()
            self._check_resubscribed()
            return
        kind = reply[0]
        if kind == self._message_kind:
            self.owner._on_message(self.order_id_of(reply[1]), reply[2])
            return
        kind = self._kinds.get(kind)
        if kind is None:
            return
        order_id = self.order_id_of(reply[1])
        self.channels = reply[2]
        self.owner._count_channels()
        command = self._sent[0] if self._sent else None
        if command is None or command.kind != kind or order_id not in command.ids:
            if kind == "unsubscribe" and order_id in self._requested:
                # Not asked for: the server let the channel go (its slot moved away).
                self._requested.discard(order_id)
                self._ready.pop(order_id, None)
                self.owner._on_subscriptions_lost(self, [order_id], "unsubscribed by the server")
            return
        ready = command.ids[order_id]
        command.remaining -= 1
        if command.remaining == 0:
            self._sent.popleft()
        if ready is not None:
            ready.set()
            log.info("Subscribed to Redis channel: %s", reply[1].decode())
        if order_id in self._late:
            # Only that order is re-checked (gathered with the other late ones into one query): a change
            # committed before the confirmation is its waiters' alone.  (Re-checking every held order for each
            # late one, 10,000 waits opening at once kept the worker re-reading all of them, 200-300 ms a
            # pass, five times a second for 13 s.)
            self._late.discard(order_id)
            self.owner.recheck_orders((order_id,))
        self._check_resubscribed()

    def _on_refused(self, exc):
        if not self._sent:
            raise exc  # an error answering nothing we sent: start over on a fresh connection
        command = self._sent.popleft()
        if command.kind != "subscribe":
            return  # a refused UNSUBSCRIBE or PING leaves nothing subscribed that should not be
        lost = [order_id for order_id in command.ids if order_id in self._requested]
        self._requested.difference_update(command.ids)
        for order_id, ready in command.ids.items():
            self._ready.pop(order_id, None)  # a later waiter waits for the next SUBSCRIBE's answer
            ready.set()  # this one goes on; the owner re-checks it
        self.owner._on_subscriptions_lost(self, lost, str(exc))
        self._check_resubscribed()

    def _check_resubscribed(self):
        # Messages may have been missed while we were away: once resubscribed, re-check everyone.
        if self._resubscribing and not self._want and not any(c.kind == "subscribe" for c in self._sent):
            self._resubscribing = False
            if self._reconnected:  # messages may have been missed while we were away
                log.info("Redis subscriber%s resubscribed %d channels", self.where, len(self._requested))
                self.owner._recheck_now.set()


class RepeatedFailures:
    """The log of a listener that fails the same way over and over: the first failure in full,
    then one ERROR a minute with how many times it failed, not a line (or traceback) each time."""

    REPORT_EVERY = 60.0

    def __init__(self, where):
        self.where = where
        self._kind = None  # (exception type, message) of the failure being counted
        self._count = 0  # failures not yet counted in a line (the first one included, until the first line)
        self._since = 0.0
        self._reported = False

    def failed(self, exc):
        """Count a failure; True if it is a new one, to be logged in full by the caller."""
        now = time.monotonic()
        kind = (type(exc), str(exc))
        if kind != self._kind:
            self.over()
            self._kind, self._since, self._count, self._reported = kind, now, 1, False
            return True
        self._count += 1
        if now - self._since >= self.REPORT_EVERY:
            self._report(now)
        return False

    def over(self):
        """The listener served a while since the last failure: count what was not yet; the next one is news."""
        if self._kind is not None and self._count > (0 if self._reported else 1):
            self._report(time.monotonic())
        self._kind = None

    def _report(self, now):
        log.error("Redis subscriber%s failing: %s: %s (%d times in the last %.0f s)", self.where,
                  self._kind[0].__name__, self._kind[1], self._count, now - self._since)
        self._count, self._since, self._reported = 0, now, True
