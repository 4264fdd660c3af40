"""Publishing on a Redis connection of its own, driven by one greenlet.

publish() never waits for anything local: it appends the message's commands
to a queue, and waits only for Redis's answer to them.  One greenlet owns one
connection and sends whatever has queued since its last round trip as one
pipelined write (SET EX + PUBLISH per message, 2N commands), then reads the 2N
replies and wakes the publishers of that batch: one round trip per batch,
however many callbacks landed meanwhile.  Waiting for the answer keeps what a
synchronous publish gave: once the webhook or the new order is answered, the
cache has the order, so a wait asked right after finds it there.  Nothing
else uses that connection, so a publish never queues behind cache reads, and
no pool can be momentarily full.  Only Redis itself can stop it: when a round trip fails (refused, reset,
no answer within the socket timeout), that batch is dropped and so is every
publish for the next PAUSE_AFTER_FAILURE seconds, so that webhooks do not pile
up behind a dead Redis; waiters everywhere re-check the database meanwhile.

A backend gives it a connection factory and, per message, the commands: the
one-Redis hub one Publisher, a cluster hub one per primary (a message's key
and channel share a slot, so its commands go to one node).
"""
import collections
import logging
import os
import time

import gevent
import gevent.event
import redis

from .. import metrics

log = logging.getLogger(__name__)

PAUSE_AFTER_FAILURE = 2.0  # seconds without publish attempts once Redis failed to answer one
MAX_BATCH = 500  # messages per write, so one huge backlog does not become one huge buffer
ANSWER_TIMEOUT = 3.0  # a publisher waits at most this for Redis's answer (connect 1 s + reply 2 s)


def redis_connection(url, name):
    """A redis-py connection to `url` (TLS and all), not yet connected, for one greenlet's sole use."""
    pool = redis.ConnectionPool.from_url(url, socket_timeout=2, socket_connect_timeout=1, socket_keepalive=True,
                                         client_name=f"{name}-{os.getpid()}")
    return pool.make_connection()



def log_sent(replies):
    """API.md's "Redis notification sent", once Redis has taken a message's every command."""
    if replies and not any(isinstance(reply, Exception) for reply in replies):
        log.info("Redis notification sent")


class Publisher:
    """One connection, one greenlet; submit() only queues."""

    def __init__(self, make_connection, where=""):
        self._make_connection = make_connection
        self._where = where  # for the log: "" with one Redis, " to <address>" for a cluster node
        self._queue = collections.deque()  # (commands, done, replies) per message, oldest first
        self._queued = gevent.event.Event()
        self._filling = gevent.event.Event()  # `done` of the messages queued since the last batch was taken
        self._conn = None
        self._reused = False  # whether the round trip in progress went out on a connection used before
        self._paused_until = 0.0
        self._up = None  # unknown until the first round trip
        self._greenlet = None

    def publish(self, commands):
        """Send one message's commands (a tuple of command tuples) and wait for Redis's answer, or its failure.

        Never raises; drops the message at once while Redis is known to be away.  Returns Redis's
        replies to these commands (error replies as exceptions), or [] when there are none.
        """
        if time.monotonic() < self._paused_until:
            metrics.publish_failures.inc()
            return []
        done, replies = self._filling, []
        self._queue.append((commands, done, replies))
        self._queued.set()
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._publish_forever)
        done.wait(ANSWER_TIMEOUT)
        return replies

    def resume(self):
        """Redis answers again (this process's subscriber just connected): publish at once, not after the pause.

        A message dropped in the pause would reach its waiters only at their next re-check (15 s);
        the re-check after resubscribing covers only what was committed before it.
        """
        self._paused_until = 0.0

    def stop(self):
        self._filling.set()  # nobody waits on a publisher that is gone
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
        self._disconnect()

    def _publish_forever(self):
        while True:
            self._queued.wait()
            self._queued.clear()
            while self._queue:
                self._filling = gevent.event.Event()
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
                try:
                    self._round_trip(batch)
                except Exception as exc:  # the greenlet must outlive anything, or the worker goes mute
                    self._failed(batch, exc)
                self._answered(batch)

    def _answered(self, batch):
        for done in {done for _, done, _ in batch}:
            if not (self._queue and self._queue[0][1] is done):  # not while part of its batch still waits
                done.set()

    def _round_trip(self, batch):
        commands = [command for message, _, _ in batch for command in message]
        try:
            replies = self._send(commands)
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            if not self._reused:
                raise
            replies = self._send(commands)  # a connection gone stale while idle: once more, on a fresh one
        start = 0
        for message, _, answers in batch:
            answers[:] = replies[start:start + len(message)]
            start += len(message)
        # MOVED and ASK (a cluster slot moving) are the caller's to follow: the cluster hub does.
        failed = next((reply for reply in replies if isinstance(reply, Exception)
                       and not isinstance(reply, redis.exceptions.AskError)), None)
        if failed is not None:  # Redis answered, but refused a command (a read-only replica, a full memory)
            metrics.publish_failures.inc(len(batch))
            log.warning("Redis refused a publish%s, waiters will re-check the database: %s", self._where, failed)
            return
        if not self._up:
            log.info("Redis Publisher connected%s", self._where)
            self._up = True

    def _send(self, commands):
        self._reused = self._conn is not None
        if self._conn is None:
            self._conn = self._make_connection()
        try:
            self._conn.send_packed_command(self._conn.pack_commands(commands))
            replies = []
            for _ in commands:
                try:
                    replies.append(self._conn.read_response())
                except redis.ResponseError as exc:  # an error reply: the connection is still in step
                    replies.append(exc)
            return replies
        except BaseException:
            self._disconnect()  # a half-read reply stream can never be trusted again
            raise

    def _failed(self, batch, exc):
        dropped = len(batch) + len(self._queue)
        batch.extend(self._queue)  # answered (with the failure) together
        self._queue.clear()
        metrics.publish_failures.inc(dropped)
        self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE
        if self._up is not False:
            log.warning("Redis publish failed%s, waiters will re-check the database: %s", self._where, exc)
        self._up = False

    def _disconnect(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()
