"""The in-process backend: one worker process, no Redis."""
import collections
import logging
import time

from .hub import CACHE_SECONDS, Hub

log = logging.getLogger(__name__)


class LocalHub(Hub):
    """One process, no Redis: a publish wakes this process's waiters directly."""

    def __init__(self, **limits):
        super().__init__(**limits)
        self._cache = collections.OrderedDict()  # id -> (expires_at, message), oldest first

    def latest(self, order_id):
        entry = self._cache.get(order_id)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def publish(self, message, quiet=False):
        now = time.monotonic()
        order_id = message["id"]
        self._cache.pop(order_id, None)
        self._cache[order_id] = (now + CACHE_SECONDS, message)
        while self._cache and next(iter(self._cache.values()))[0] < now:
            self._cache.popitem(last=False)
        self._deliver(order_id, message)
        if not quiet:
            log.info("Redis notification sent")  # same event line as with Redis, so logs read alike
