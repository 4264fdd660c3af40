"""One pub/sub connection, and the one greenlet that uses it.

Both Redis backends subscribe through this: the one-Redis hub with one
Subscriber per process, the cluster hub with one per primary.  The greenlet
drives a raw redis-py Connection with select(): it sends (S)SUBSCRIBE and
(S)UNSUBSCRIBE as the owning hub gains and loses waiters, pings an idle
server, and hands each message to the hub.  Nothing else touches the socket.

redis-py's PubSub and ClusterPubSub are not used: they cannot tell an
unsubscribe we asked for from one the server sends on its own (a cluster node
that loses a slot drops its channels that way), and they resubscribe without
saying so.  Here every reply is matched to the command it answers.

The owner (a hub) provides:
  _wanted(subscriber, order_id) -> bool   the channel should be subscribed here now
  _held_by(subscriber) -> ids             what to subscribe on a fresh connection
  _on_message(order_id, data)             a message arrived
  _on_subscriber_down(subscriber, exc)    the connection is lost (it reconnects by itself)
  _on_subscriptions_lost(subscriber, ids, reason)   the server dropped or refused channels
  _count_channels()                       the subscribed channel counts changed
  _recheck_now                            an Event: set it to re-check every waiter
  degraded_interval                       seconds between re-checks while disconnected (for the log)
"""
import collections
import errno
import logging
import os
import random
import time

import gevent
import gevent.event
import gevent.select
import redis
from redis.connection import parse_url

from .. import metrics

log = logging.getLogger(__name__)

SUBSCRIBE_CONFIRM_TIMEOUT = 2.0  # past this, the waiter goes on and the re-check covers it
SUBSCRIBE_BATCH = 1000


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
        self._wake_r = self._wake_w = None
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

        A waiter that gives up reads on regardless: when the confirmation does come, every
        held order is re-checked, so a change committed in between is not missed.
        """
        ready = self.subscribe(order_id)
        if ready is not None and not ready.wait(SUBSCRIBE_CONFIRM_TIMEOUT):
            self._late.add(order_id)

    def resubscribe(self, order_id):
        """Subscribe a channel that was lost or lived elsewhere; re-check every held order once confirmed."""
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
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self.greenlet = gevent.spawn(self._listen_forever)

    def stop(self):
        if self.greenlet is not None:
            self.greenlet.kill()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self.greenlet = None
            self._wake_r = self._wake_w = None  # a closed descriptor's number may be reused: never write to it

    def _wake(self):
        if self._wake_w is None:
            return
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    # -- the greenlet: the only user of the connection --

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
                    log.exception("Redis listener%s failed; reconnecting", self.where)
                if self.connected is not False:
                    self._on_disconnected(exc)
                else:
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
        log.info("Redis subscriber connected%s", self.where)
        return conn

    def _on_disconnected(self, exc):
        self.connected = False
        self.channels = 0
        metrics.listener_connected.labels(self.node).set(0)
        metrics.redis_transitions.labels("disconnected").inc()
        self.owner._count_channels()
        log.warning("Redis subscriber%s disconnected, re-checking the database every %gs until it is back: %s",
                    self.where, self.owner.degraded_interval, exc)
        for ready in self._ready.values():
            ready.set()  # nobody waits for a confirmation that cannot come
        self.owner._on_subscriber_down(self, exc)

    def _serve(self, conn):
        sock = conn._sock  # redis-py keeps it private; we only select() on it
        ping_sent = None
        while True:
            self._sync(conn)
            while conn.can_read(timeout=0):
                self._read(conn)
                ping_sent = None
            timeout = self.ping_interval if ping_sent is None else max(0, ping_sent + self.ping_interval - time.monotonic())
            readable, _, _ = gevent.select.select([sock, self._wake_r], [], [], timeout)
            if self._wake_r in readable:
                self._drain_wake_pipe()
            if not readable:
                if ping_sent is not None:
                    raise redis.ConnectionError(f"no PONG from Redis{self.where} within {self.ping_interval:g}s")
                conn.send_command("PING")
                self._sent.append(Command("ping", {}))
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
            self._late.discard(order_id)
            self.owner._recheck_now.set()
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
