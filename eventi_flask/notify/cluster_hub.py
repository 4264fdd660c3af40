"""The Redis Cluster backend: sharded pub/sub, one subscriber connection per primary.

Chosen at start-up when the node at REDIS_URL says `cluster_enabled:1`.  An
order's channel `order:{<id>}:status` and cache key `order:{<id>}:latest` share
a hash slot, so its publish is one round trip to one primary (SET, then
SPUBLISH: only that shard carries the message) and its subscription lives on
that primary alone.

The slot map (CLUSTER SLOTS) says which primary owns an order.  Each primary
gets a Subscriber (subscriber.py) when the process first holds a wait there:
at most one subscriber connection per primary per process.  When the cluster
changes under us (a slot moves and its node drops our channels with an
unrequested SUNSUBSCRIBE, or a command is answered MOVED, or a primary stops
answering), a background greenlet reads the slot map again, moves the held
orders to their new owner's subscriber and re-checks them in the database.
While any primary's subscriber is down the whole process re-checks every
WAIT_RECHECK_INTERVAL_DEGRADED seconds (with full coverage required, a lost
primary stops the others too).
"""
import functools
import itertools
import json
import logging
from urllib.parse import urlsplit, urlunsplit

import gevent
import gevent.event
import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from .. import metrics
from .hub import CACHE_SECONDS, Hub, cached_message
from .publisher import Publisher, log_sent, redis_connection
from .redis_hub import RedisHub
from .subscriber import Subscriber, chunks, connection_options, short_lived_client

log = logging.getLogger(__name__)

REFRESH_PAUSE = 0.2, 5.0  # between two reads of the slot map: doubling from the first while the cluster
# keeps refusing our subscriptions (CLUSTERDOWN, or a map that has not settled), up to the second
REFRESH_WHILE_DOWN = 2.0  # how often to read it again while a primary is unreachable


@functools.lru_cache(maxsize=8)  # asked by the hub and the order limiter, once each per process
def is_cluster(url):
    """True when the Redis at `url` is a cluster node; False when it is not or cannot say."""
    try:
        with short_lived_client(url) as client:
            return client.info("cluster").get("cluster_enabled") == 1
    except (redis.RedisError, OSError) as exc:
        log.warning("Could not ask Redis whether it is a cluster (%s); running as on one Redis", exc)
        return False


def node_url(url, address):
    """`url` (its scheme, credentials and TLS settings) aimed at the node `address`."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{credentials}@{address}" if credentials else address))


class Node:
    """One primary as this process talks to it, apart from subscribing.

    Publishes go through a Publisher of their own (publisher.py: one connection, one
    round trip per batch), so a burst of waits reading the cache never holds one up.
    """

    __slots__ = ("address", "cache", "publisher")

    def __init__(self, url, address):
        host, port = address.rsplit(":", 1)
        self.address = address
        self.cache = RedisHub.cache_client(url, host=host, port=int(port))
        self.publisher = Publisher(lambda: redis_connection(node_url(url, address), "eventi-pub"), f" to {address}")

    def close(self):
        self.cache.close()
        self.publisher.stop()


class ClusterHub(Hub):
    """Sharded pub/sub on a Redis Cluster, one subscriber connection per primary."""

    def __init__(self, url, prefix="", **limits):
        super().__init__(**limits)
        self.url = url
        self.prefix = prefix
        options = connection_options(url)
        self.seed = f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"
        self.ping_interval = 5.0
        self._channel_start = len(f"{prefix}order:{{".encode())
        self._slots = [None] * REDIS_CLUSTER_HASH_SLOTS  # slot -> "host:port" of its primary
        self._nodes = {}  # address -> Node
        self._subscribers = {}  # address -> Subscriber
        self._owner = {}  # order id -> the Subscriber its channel is subscribed on
        self._lost = set()  # order ids whose subscription the cluster dropped or refused
        self._refresh = gevent.event.Event()
        self._refresher = None
        self._refresh_slots()

    # -- names: the hash tag puts an order's channel and key in one slot --

    def channel(self, order_id):
        return f"{self.prefix}order:{{{order_id}}}:status"

    def cache_key(self, order_id):
        return f"{self.prefix}order:{{{order_id}}}:latest"

    def _order_id_of(self, channel):
        return channel[self._channel_start:-len(b"}:status")].decode()

    def slot(self, order_id):
        return key_slot(self.channel(order_id).encode())

    def _batches(self, order_ids):
        """SSUBSCRIBE takes channels of one slot only (else CROSSSLOT): one command per slot."""
        by_slot = sorted(order_ids, key=self.slot)
        for _, same_slot in itertools.groupby(by_slot, key=self.slot):
            yield from chunks(same_slot)

    # -- the slot map --

    def _primary(self, order_id):
        return self._slots[self.slot(order_id)] or self.seed

    def _node(self, address):
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = Node(self.url, address)
        return node

    def _read_slot_map(self):
        """CLUSTER SLOTS from the first node that answers: a list of slot -> primary address."""
        candidates = [self.seed] + [a for a in dict.fromkeys(self._slots) if a and a != self.seed]
        error = None
        for address in candidates:
            host, port = address.rsplit(":", 1)
            try:
                with short_lived_client(self.url, host, int(port)) as client:
                    ranges = client.execute_command("CLUSTER SLOTS")
            except (redis.RedisError, OSError) as exc:
                error = exc
                continue
            slots = [None] * REDIS_CLUSTER_HASH_SLOTS
            for first, last, primary, *_ in ranges:
                primary_host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
                owner = f"{primary_host or host}:{primary[1]}"  # an empty host means "the one you asked"
                slots[first:last + 1] = [owner] * (last - first + 1)
            return slots
        raise redis.ConnectionError(f"no cluster node answered CLUSTER SLOTS: {error}")

    def _refresh_slots(self):
        try:
            slots = self._read_slot_map()
        except redis.RedisError as exc:
            log.warning("Could not read the Redis Cluster slot map: %s", exc)
            return False
        changed = slots != self._slots
        self._slots = slots
        moved = 0
        for order_id, subscriber in list(self._owner.items()):
            address = self._primary(order_id)
            if address != subscriber.node:
                subscriber.forget(order_id)
                self._owner[order_id] = subscriber = self._subscriber(address)
            elif order_id not in self._lost:
                continue
            if self._waiters.get(order_id):
                subscriber.resubscribe(order_id)
                moved += 1
        self._lost.clear()
        primaries = set(slots)
        for address, subscriber in list(self._subscribers.items()):
            if address not in primaries and subscriber not in self._owner.values():
                subscriber.stop()  # no longer a primary: nothing of ours lives there
                del self._subscribers[address]
                metrics.listener_connected.labels(address).set(0)
        for address in set(self._nodes) - primaries:
            self._nodes.pop(address).close()
        if changed or moved:
            log.info("Redis Cluster slot map read: %d primaries; %d held orders resubscribed",
                     len(primaries - {None}), moved)
        if moved:
            # Messages may have been lost while the slot moved: re-check now, and again once resubscribed.
            self._recheck_now.set()
        return True

    def _refresh_forever(self):
        pause = REFRESH_PAUSE[0]
        while True:
            # Unsettled (a primary away, the map unknown, subscriptions to place): look again soon.
            unsettled = self._lost or self._slots[0] is None or any(
                s.connected is False for s in self._subscribers.values())
            self._refresh.wait(REFRESH_WHILE_DOWN if unsettled else None)
            self._refresh.clear()
            resubscribing = bool(self._lost)
            try:
                self._refresh_slots()
            except Exception:
                log.exception("Reading the Redis Cluster slot map failed")
            gevent.sleep(pause)
            # Lost again right after resubscribing: the cluster is not ready for us yet; back off.
            pause = min(pause * 2, REFRESH_PAUSE[1]) if resubscribing and self._lost else REFRESH_PAUSE[0]

    def _request_refresh(self):
        self._refresh.set()

    # -- publishing and the cache: a pooled client per primary --

    def _away(self, address):
        # Our subscriber there lost its connection: don't make each wait or webhook pay a timeout.
        subscriber = self._subscribers.get(address)
        return subscriber is not None and subscriber.connected is False

    def latest(self, order_id):
        address = self._primary(order_id)
        if self._away(address):
            return None  # the database answers
        try:
            raw = self._routed(address, [("GET", self.cache_key(order_id))])
        except (redis.RedisError, OSError):
            return None
        return cached_message(raw)

    def publish(self, message, quiet=False):
        # Not gated on that node's subscriber (as latest() is): the node may be back before it
        # reconnects, and the node's Publisher stops trying for a moment after a failed round trip.
        order_id = message["id"]
        address = self._primary(order_id)
        payload = json.dumps(message, separators=(",", ":"))
        # Cache first: a waiter subscribing between the two still finds it.
        commands = (("SET", self.cache_key(order_id), payload, "EX", CACHE_SECONDS),
                    ("SPUBLISH", self.channel(order_id), payload))
        replies = self._node(address).publisher.publish(commands)
        redirected = [(command, reply) for command, reply in zip(commands, replies)
                      if isinstance(reply, redis.exceptions.AskError)]  # MovedError is one too
        if not redirected:
            if not quiet:
                log_sent(replies)
            return
        # The slot is moving or has moved: send what was refused where it now lives (the rest stands).
        moved = isinstance(redirected[0][1], redis.exceptions.MovedError)
        if moved:
            self._request_refresh()
        try:
            self._routed(f"{redirected[0][1].host}:{redirected[0][1].port}", [command for command, _ in redirected],
                         asking=not moved)
        except (redis.RedisError, OSError) as exc:
            metrics.publish_failures.inc()
            log.warning("Redis publish of order %s after a slot move failed, waiters will re-check the database: %s",
                        order_id, exc)
            return
        if not quiet:
            log.info("Redis notification sent")

    def _routed(self, address, commands, asking=False):
        """Run `commands` (argument tuples) in one round trip on `address`; return the last one's answer.

        Commands answered MOVED or ASK (a slot moving) are sent once more where they point;
        the others stand.  During a migration the source still serves the channel (SPUBLISH
        reaches our subscribers there) while a key missing there is ASKed to the target.
        """
        answers = [None] * len(commands)
        pending = list(range(len(commands)))
        for attempt in (1, 2):
            pipe = self._node(address).cache.pipeline(transaction=False)
            for i in pending:
                if asking:
                    pipe.execute_command("ASKING")  # the slot is being imported there: let the next command in
                pipe.execute_command(*commands[i])
            results = pipe.execute(raise_on_error=False)
            if asking:
                results = results[1::2]
            redirected = []
            for i, result in zip(pending, results):
                if isinstance(result, redis.exceptions.AskError) and attempt == 1:  # MovedError is one too
                    redirected.append(i)
                    address, asking = f"{result.host}:{result.port}", not isinstance(result, redis.exceptions.MovedError)
                elif isinstance(result, Exception):
                    raise result
                else:
                    answers[i] = result
            if not redirected:
                return answers[-1]
            if not asking:
                self._request_refresh()
            pending = redirected

    def ready(self):
        primaries = sorted(set(self._slots) - {None})
        if len(primaries) == 0 or None in self._slots:
            return False, "redis cluster: slot map unknown or incomplete"
        failed = []
        for address in primaries:
            try:
                self._node(address).cache.ping()
            except (redis.RedisError, OSError) as exc:
                failed.append(f"{address}: {exc}")
        if failed:
            return False, "redis cluster: " + "; ".join(failed)
        return True, f"redis cluster ({len(primaries)} primaries)"

    # -- subscribing: one Subscriber per primary --

    @property
    def connected(self):
        states = [s.connected for s in self._subscribers.values()]
        if False in states or self._slots[0] is None:
            return False
        return None if None in states else True

    def _subscriber(self, address):
        subscriber = self._subscribers.get(address)
        if subscriber is None:
            host, port = address.rsplit(":", 1)
            subscriber = self._subscribers[address] = Subscriber(
                self, connection_options(self.url, host, int(port)), self.channel, self._order_id_of,
                sharded=True, node=address, batches=self._batches, ping_interval=self.ping_interval)
            if self._poller is not None:
                subscriber.start()
        return subscriber

    def _ensure_subscribed(self, order_id):
        subscriber = self._owner.get(order_id)
        if subscriber is None:
            subscriber = self._owner[order_id] = self._subscriber(self._primary(order_id))
        if subscriber.connected is False:
            return  # degraded: the re-check every few seconds stands in for messages
        subscriber.confirm(order_id)

    def _release(self, order_id):
        subscriber = self._owner.pop(order_id, None)
        if subscriber is not None:
            subscriber.release(order_id)

    def _start_background(self):
        super()._start_background()
        if self._refresher is None:
            self._refresher = gevent.spawn(self._refresh_forever)
        for subscriber in self._subscribers.values():
            subscriber.start()

    def _greenlets(self):
        return super()._greenlets() + [g for g in (self._refresher,) if g is not None]

    def stop(self):
        super().stop()
        for subscriber in self._subscribers.values():
            subscriber.stop()
        for node in self._nodes.values():
            node.publisher.stop()

    # -- what each Subscriber asks of its owner --

    def _wanted(self, subscriber, order_id):
        return bool(self._waiters.get(order_id)) and self._owner.get(order_id) is subscriber

    def _held_by(self, subscriber):
        return [order_id for order_id, owner in self._owner.items() if owner is subscriber]

    def _on_subscriber_down(self, subscriber, exc):
        self._recheck_now.set()
        self._request_refresh()  # a replica may be promoted in its place

    def _on_subscriber_up(self, subscriber):
        self._node(subscriber.node).publisher.resume()

    def _on_subscriptions_lost(self, subscriber, order_ids, reason):
        if not self._lost:
            log.info("Redis Cluster node %s dropped subscriptions (%s); reading the slot map again",
                     subscriber.node, reason)
        self._lost.update(order_ids)
        self._request_refresh()

    def _count_channels(self):
        metrics.subscribed_channels.set(sum(s.channels for s in self._subscribers.values()))
