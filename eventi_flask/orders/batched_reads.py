"""Reading orders for the waits that arrive together: many orders per query, one connection.

After a deploy every status page reconnects at once.  Read one query and one pooled
connection per wait, 10,000 waits arriving within a second queued for the pool's 30
connections, and those still queued after the pool's timeout were answered 503
(issue 16).  Here an arriving wait only queues its order id; one greenlet reads what
has queued in one query on one connection, then what queued meanwhile, and so on.
There is no timer: a batch is whatever arrived while the previous one was read, so a
lone wait is read at once and a storm is read in a few large queries.  A wait that
queues holds no database connection.
"""
import itertools

import gevent
import gevent.event

# Ids per query: large enough that a storm takes few queries, small enough that one
# query (and building its bodies, on the event loop) stays a few milliseconds.
BATCH_SIZE = 500


class BatchedReads:
    """read(key) -> its value or None, read together with the keys others are waiting for: the waits' orders
    (order id -> public body), the Idempotency-Keys of buyers sent to a line (key -> True when used)."""

    def __init__(self, read_many, batch_size=BATCH_SIZE):
        self._read_many = read_many  # keys -> {key: value} for those found; raises while the database is away
        self._batch_size = batch_size
        self._queued = {}  # order id -> AsyncResult, shared by every wait queued for it
        self._reader = None

    def read(self, order_id):
        """The order's body (None: no such order); raises what its batch's read raised."""
        result = self._queued.get(order_id)
        if result is None:
            result = self._queued[order_id] = gevent.event.AsyncResult()
            if self._reader is None:
                self._reader = gevent.spawn(self._read_queued)
        return result.get()

    def _read_queued(self):
        try:
            while self._queued:
                ids = list(itertools.islice(self._queued, self._batch_size))
                batch = {order_id: self._queued.pop(order_id) for order_id in ids}
                try:
                    bodies = self._read_many(ids)
                except Exception as exc:
                    # Each wait of the batch answers as its own read would have: a 503 while the database is away.
                    for result in batch.values():
                        result.set_exception(exc)
                    continue
                for order_id, result in batch.items():
                    result.set(bodies.get(order_id))
        finally:
            self._reader = None
