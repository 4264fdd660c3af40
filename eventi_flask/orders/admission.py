"""Shedding order creations this worker cannot answer quickly: 503 `busy` before anything is saved.

The signal is how late this worker's event loop runs.  Every request's greenlet waits its turn
on the loop at each database query and HTTP call, so when more buyers are in flight than the
worker's CPU can serve, every turn comes later, for everyone: a buyer's wait is a few turns
times this lag.  A greenlet of the worker's own measures it (how late a timer fires, every
SAMPLE_SECONDS) into a moving average that an arriving order only reads: when each order measured
it with a timer of its own, that timer cost every order one more turn of a busy loop (at sales
open, 600 joins a second, a third of a POST's time inside the worker).  Below ORDER_SHED_LAG's first figure every order is admitted;
above its second every one is shed; in between a share that grows in proportion, so admission
eases off rather than flapping between all and nothing.  A shed buyer is told to come back
after 1-5 s, spread at random so that the retries do not arrive together.

Measured rather than counted: a cap on orders in flight would also count orders waiting on a
slow PayHero, which cost this worker nothing meanwhile.

The second signal is how long the reservation (one statement on the database) takes.  Past about
120 buyers a second the event loop is not late at all, yet buyers queue for seconds on the
ticket type's row lock in PostgreSQL (BENCHMARKS.md, issue 16): the loop's lag never saw them.
Each reservation's time goes into a second moving average, which decays while nobody reserves
(so a worker that sheds every order comes back); an order is shed by whichever signal asks more.
"""
import contextlib
import logging
import random
import time

import gevent
from flask import current_app

from .. import metrics
from ..errors import ApiError

log = logging.getLogger(__name__)

EXTENSION = "eventi.order_admission"
RETRY_AFTER_SECONDS = (1, 5)
# A timer's lateness, every this often: gevent.sleep(0) comes back after the other ready greenlets but
# before the loop polls for I/O (at most gevent's switch interval later), and missed a loop that was
# seconds behind.  A timer does not.
SAMPLE_SECONDS = 0.05
# Weight of the newest sample: the average follows the loop within half a second, and one slow turn alone
# (a full garbage collection, say) does not shed anyone.
SMOOTHING = 0.1
# Seconds a reservation may take on average before a growing share of orders is shed, and all of
# them: a buyer waits about one reservation, then PayHero; well inside the 2 s an answer may take.
RESERVATION_SHED = (0.15, 0.6)
# While nobody reserves (every order shed), the reservations' average halves every this many seconds.
RESERVATION_HALF_LIFE = 0.5


class Admission:
    def __init__(self, shed_from, shed_all_at):
        self.shed_from, self.shed_all_at = shed_from, shed_all_at
        self.lag = 0.0
        self.reservation = 0.0  # moving average of a reservation's seconds
        self._reserved_at = time.monotonic()
        self.shedding = False
        self._sampler = None  # the greenlet measuring the loop's lag, started by the first order in this process

    def admit(self):
        """True to go on with an arriving order; False to shed it (or to send it to its event's line)."""
        shed_share = self.shed_share()
        admitted = shed_share <= 0 or (shed_share < 1 and random.random() >= shed_share)
        self._note(admitted)
        return admitted

    def shed_share(self):
        """The share of arriving orders this worker would shed now, 0 to 1 (the line's admitter reads it too)."""
        if self._sampler is None or self._sampler.dead:  # started here, in the worker (not before gunicorn forks)
            self._sampler = gevent.spawn(self._sample_forever)
        return max(_share(self.lag, self.shed_from, self.shed_all_at), _share(self._reservation_now(), *RESERVATION_SHED))

    def stop(self):
        if self._sampler is not None:
            self._sampler.kill(block=False)
            self._sampler = None

    def _sample_forever(self):
        while True:
            started = time.perf_counter()
            gevent.sleep(SAMPLE_SECONDS)  # a timer: it fires after a whole turn of the loop, I/O included
            self.lag += (max(time.perf_counter() - started - SAMPLE_SECONDS, 0) - self.lag) * SMOOTHING

    def reserved(self, seconds):
        """An admitted order's reservation took `seconds` (waiting for the database included)."""
        self.reservation = self._reservation_now() + (seconds - self._reservation_now()) * SMOOTHING
        self._reserved_at = time.monotonic()

    def _reservation_now(self):
        return self.reservation * 0.5 ** ((time.monotonic() - self._reserved_at) / RESERVATION_HALF_LIFE)

    def _note(self, admitted):
        metrics.loop_lag.set(self.lag)
        # One line when shedding starts and one when every order is admitted again, not one per order.
        if not admitted and not self.shedding:
            self.shedding = True
            log.warning("Shedding new orders: this worker's event loop runs %.0f ms late, a reservation takes %.0f ms",
                        self.lag * 1000, self._reservation_now() * 1000)
        elif admitted and self.shedding and self.lag <= self.shed_from and self._reservation_now() <= RESERVATION_SHED[0]:
            self.shedding = False
            log.info("Admitting every new order again: the event loop runs %.0f ms late", self.lag * 1000)


def _share(value, low, high):
    """The share of orders to shed for a signal at `value`: 1 from `high`, 0 up to `low`, in proportion between."""
    if value >= high:
        return 1.0
    if value <= low:
        return 0.0
    return (value - low) / (high - low)


@contextlib.contextmanager
def reservation_timed():
    """A context for the reservation's statement: its time goes to this worker's admission, if any."""
    admission = current_app.extensions.get(EXTENSION)
    started = time.perf_counter()
    try:
        yield
    finally:
        if admission is not None:
            admission.reserved(time.perf_counter() - started)


def busy():
    """503 `busy`: nothing saved or reserved, and no line to hold the buyer (counted as shed)."""
    metrics.orders_shed.inc()
    return ApiError(503, "busy", "Many people are buying right now; please try again in a few seconds.",
                    headers={"Retry-After": str(random.randint(*RETRY_AFTER_SECONDS))})


def init_app(app):
    lag = app.config["ORDER_SHED_LAG"]
    if lag:  # "off": every order admitted (none measured)
        app.extensions[EXTENSION] = Admission(*lag)


def stop(app):
    """No more sampling of the loop's lag for this app (its tests end; a worker's exit ends it anyway)."""
    admission = app.extensions.get(EXTENSION)
    if admission is not None:
        admission.stop()
