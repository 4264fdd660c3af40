"""The line's outflow: one admitter per event decides who is next; every worker makes their orders.

Every worker runs this loop.  For each event with a line, the one holding the event's lease (a short
Redis key, SET NX PX, renewed every tick by its owner) leads: one order of service, one measured
rate, one message per tick.  A worker that dies stops renewing and another takes over within
LEASE_TICKS ticks.  Each tick the lead:

1. marks `left` the places whose pages stopped asking (LINE_PATIENCE);
2. at sales_start, shuffles the pre-queue (once per opening);
3. takes the next places in join order, as many as the outflow allows, onto the event's ready list;
4. publishes one message for the event (its head, the tickets gone out of the middle, the measured
   rate) through the notification hub: one message per worker, whatever the number of waiters.

Then every worker (the lead too) claims its share of the ready list, in order, and makes each
place's order through orders.service.create_order with the Idempotency-Key stored in the place when
it joined, spread over the tick: the orders' work is shared by the workers as POST's was.  A retry of
an admission (a worker died mid-way and the lead finds the place stalled) answers the order already
made instead of making a second one.  Each worker reports its orders' answer times to the lead.

The outflow follows what the service takes: it grows by a tenth a tick while admitted orders are
answered well within the 2 s target and the lead's admission signals (event-loop lag, reservation
time) say it would shed nothing, holds while they say it is late, and shrinks by a fifth when orders
answer slowly or those signals say it would shed half or more, capped by the event's max_rate.
"""
import json
import logging
import os
import random
import socket
import time

import gevent
from flask import current_app
from sqlalchemy.exc import SQLAlchemyError

from .. import database, metrics
from ..clock import utcnow
from ..errors import ApiError
from ..extensions import db
from ..notify.service import get_hub
from ..orders import service as orders
from ..orders.admission import EXTENSION as ADMISSION
from ..orders.schemas import isoformat
from . import service

log = logging.getLogger(__name__)

LEASE_TICKS = 3  # the lease outlives this many ticks without renewal
SWEEP_LIMIT = 2000  # places marked left per tick at most
# Pauses between attempts at a place's order while the database answers 503: first, and at most (seconds).
DATABASE_RETRY_FIRST, DATABASE_RETRY_MOST = 0.5, 5.0
IDLE_SECONDS = 60  # an event with an empty line and no joins for this long leaves the active set
# The outflow's control: p90 of admitted orders' answer time above SLOW shrinks it, below FAST grows it
# (while the lead's loop has no lag to speak of).  A rise shows in the answer times only seconds later
# (the STK push, the callback, the page's wait all follow an admission), so the steps are small: at
# x1.2 up and x0.7 down the outflow swung between 0 and 155 a second with a period of ~25 s at a sale
# of 6,000 (bench line), the workers idle in every trough.
SLOW, FAST = 1.2, 0.75
INCREASE, DECREASE, MIN_RATE = 1.1, 0.8, 1.0
SHED_CUT = 0.5  # the lead's admission would shed this share of new orders: past capacity, cut
IN_FLIGHT_SECONDS = 2.0  # places taken and not yet served at most: this many seconds of the outflow (and 4)
WORKER_IN_FLIGHT = 200  # orders one worker makes at once at most
RATE_SMOOTHING = 0.2  # weight of the newest tick in the measured serving rate
RATE_FALL_PER_SECOND = 0.98  # the rate shown falls at most this much a second, so estimates rise gently
LEARN_AFTER_SECONDS = 30  # a line that has been served this long teaches the next where to start


class Outflow:
    """How many places one event admits each tick, and the serving rate its estimates use."""

    def __init__(self, start, cap, measured=None):
        self.cap = cap
        self.rate = min(start, cap) if cap else start
        self.start = self.rate  # a rate the service is known to take: LINE_START_RATE, or what a line averaged
        self.allowance = 0.0
        self.latencies = []
        # Places served a second, smoothed: from the rate the estimates were already given with (the last lead's
        # published rate, or the first outflow), never from one tick alone.  A first tick that took the first few
        # places of a forming line, or a new lead's first tick after a takeover, "measured" a few a second: every
        # estimate went up tenfold for a tick, then down again (a rise of 3,800 % seen at 600 arrivals/s).
        self.measured = measured or self.rate
        self.share = 0.0  # of the places leaving the line, those who left (gave up), smoothed
        self.served = self.serving_seconds = 0.0  # places taken, and seconds spent taking them, since it began
        self._ticked = None  # monotonic time of the last tick

    def elapsed(self, tick_seconds):
        """Seconds since the last tick, as they passed: a busy loop runs its 1 s ticks every 1.1-1.3 s, and
        counting them as 1 s each overstated the rate shown (and learned) by as much."""
        now = time.monotonic()
        last, self._ticked = self._ticked, now
        return tick_seconds if last is None else min(max(now - last, tick_seconds / 2), tick_seconds * LEASE_TICKS)

    def average(self):
        """Places taken a second over the whole line so far, once it has run LEARN_AFTER_SECONDS; else None.
        Not the rate shown (which may fall only 2 % a second, so it stays near an outflow's peaks)."""
        return self.served / self.serving_seconds if self.serving_seconds >= LEARN_AFTER_SECONDS else None

    def adjust(self, shed_share, backlog):
        recent = sorted(self.latencies)
        self.latencies = []
        slow = recent[int(len(recent) * 0.9)] if recent else None
        if shed_share >= SHED_CUT or (slow is not None and slow > SLOW):
            self.rate = max(MIN_RATE, self.rate * DECREASE)
        elif backlog and shed_share == 0 and (slow is None or slow < FAST):
            # Back to the start at once, then in small steps: the arrivals' burst cut the outflow to a third
            # (its CPU slowed every answer), and from there a tenth a tick took 15 s to climb back while the
            # workers idled at half a core each (bench line, 6,000 at 600/s).
            self.rate = max(self.rate * INCREASE + 1, self.start)
        # else hold: the loop is late but not shedding half, or the answers are between FAST and SLOW
        if self.cap:
            self.rate = min(self.rate, self.cap)

    def budget(self, seconds, admitting):
        """Places to take this tick; `admitting`: those taken and not yet served, everywhere."""
        # Saved up for two ticks at most (or one place, for an outflow under one a tick).
        self.allowance = min(self.allowance + self.rate * seconds, max(self.rate * seconds * 2, 1))
        room = max(int(self.rate * IN_FLIGHT_SECONDS), 4) - admitting
        count = max(min(int(self.allowance), room), 0)
        self.allowance -= count
        return count

    def measure(self, served, left, seconds):
        self.served += served
        self.serving_seconds += seconds
        rate = served / seconds
        smoothed = self.measured + (rate - self.measured) * RATE_SMOOTHING
        self.measured = max(smoothed, self.measured * RATE_FALL_PER_SECOND ** seconds)
        if served + left:
            self.share += (left / (served + left) - self.share) * RATE_SMOOTHING


class Admitter:
    """This worker's part in every line: the lead where it holds the lease, and its share of the orders."""

    def __init__(self, app, line):
        self.app = app
        self.line = line
        self.tick_seconds = app.config["LINE_TICK"]
        self.patience_ms = int(app.config["LINE_PATIENCE"] * 1000)
        # An order whose making began this long ago and never finished: its worker died; make it again.
        self.stalled_ms = int((app.config["PAYHERO_CONNECT_TIMEOUT"] + app.config["PAYHERO_READ_TIMEOUT"] + 5) * 1000)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.outflows = {}  # slug -> Outflow, for the events whose lease this worker holds
        self.last = {}  # slug -> the line's state after this worker's last move of it
        self.opened = set()  # (slug, opening) whose pre-queue was shuffled (or found shuffled)
        self.in_flight = set()  # place ids whose orders this worker is making
        self.answered = {}  # slug -> answer times of orders made here, not yet reported
        self._greenlet = None

    def start(self):
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run_forever)

    def stop(self):
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None

    def shut_down(self):
        """The worker is stopping (SIGTERM): no more ticks here, and its leases go now, so another
        worker admits from its next tick.  Orders being made finish if the worker lives long enough;
        one cut short is made again (once, by its key) when the admitter finds it stalled."""
        self.stop()
        for slug in list(self.outflows):
            try:
                self.line.store.release(slug, self.owner)
            except self.line.store_errors:
                pass  # it expires within LEASE_TICKS ticks anyway
        self.outflows.clear()

    def _run_forever(self):
        failing = False
        while True:
            gevent.sleep(self.tick_seconds)
            try:
                with self.app.app_context():
                    for slug in self.line.store.active_events():
                        self.lead(slug)
                        self.serve(slug)
                if failing:
                    log.info("The line's admitter works again")
                failing = False
            except self.line.store_errors as exc:
                if not failing:  # one line per outage, not one per tick
                    log.warning("The line's admitter cannot reach its store: %s", exc)
                failing = True
            except Exception:
                log.exception("The line's admitter failed a tick")

    def tick(self, slug):
        self.lead(slug)
        self.serve(slug)

    def lead(self, slug):
        """One move of `slug`'s line, if this worker holds its lease: who left, who is next, the message."""
        store = self.line.store
        if not store.lease(slug, self.owner, int(self.tick_seconds * LEASE_TICKS * 1000)):
            if self.outflows.pop(slug, None) is not None:
                metrics.line_length.labels(slug).set(0)  # its new admitter's worker tells the length now
            return
        settings = service.event_line(slug)
        if settings is None:
            return
        outflow = self.outflows.get(slug)
        if outflow is None:
            # From the rate this line last published (a new lead does not start the ramp again), else the rate
            # the service's last line averaged, else LINE_START_RATE: at a sale's opening nearly everyone joins
            # within seconds, and their estimates use this start (40 against a line served at 70-75 a second:
            # a quarter of them told a wait within 20 %; from the rate a rehearsal measured, 98.6 %).
            published = store.summary(slug)["rate"]
            floor = self.line.start_rate()
            outflow = self.outflows[slug] = Outflow(max(floor, published), settings.max_rate, published)
        now_ms = service.now_ms()
        seconds = outflow.elapsed(self.tick_seconds)
        left = store.sweep(slug, now_ms - self.patience_ms, SWEEP_LIMIT)
        if left:
            metrics.line_left.labels(slug).inc(left)
        last = self.last.get(slug)
        busy = bool(left) or last is None or bool(last["length"] or last["admitting"])
        taken = []
        if settings.seconds_to_opening(utcnow()) <= 0:  # before sales_start the pre-queue only waits
            busy |= self._open(slug, settings)
            self._make_stalled(slug, now_ms)
            outflow.latencies = store.latencies(slug)
            admission = current_app.extensions.get(ADMISSION)
            outflow.adjust(admission.shed_share() if admission is not None else 0, backlog=True)
            taken = store.take(slug, outflow.budget(seconds, last["admitting"] if last else 0), now_ms)
            for joined_ms in taken:
                metrics.line_wait.observe(max(now_ms - joined_ms, 0) / 1000)
        if not (busy or taken):
            self._idle(slug, now_ms)
            return
        # One message per tick while anyone waits or is being served: each wait works out its place from it.
        outflow.measure(len(taken), left, seconds)
        average = outflow.average()
        if average is not None and not settings.max_rate:  # a capped line measures its cap, not the service
            store.learn_rate(average)
        state = self.last[slug] = store.advance(slug, outflow.measured, outflow.share)
        self._publish(slug, state, outflow)
        metrics.line_length.labels(slug).set(state["length"])

    def _idle(self, slug, now_ms):
        metrics.line_length.labels(slug).set(0)
        self.line.store.forget_event(slug, now_ms - IDLE_SECONDS * 1000)

    def serve(self, slug):
        """Claim this worker's share of the places whose turn came, and make their orders, spread over the tick."""
        store = self.line.store
        answered = self.answered.pop(slug, None)
        if answered:
            store.report(slug, answered)
        room = WORKER_IN_FLIGHT - len(self.in_flight)
        if room <= 0:
            return
        now_ms = service.now_ms()
        claimed = store.claim(slug, self.owner, now_ms, int(self.tick_seconds * LEASE_TICKS * 1000), room)
        for i, place in enumerate(claimed):
            self.in_flight.add(place.id)
            # Spread over the tick: a burst of orders at once would queue on the loop and the row lock.
            gevent.spawn_later(self.tick_seconds * i / len(claimed), self._admit, slug, place)

    def _open(self, slug, settings):
        """At sales_start: the pre-queue in a random order, once.  True when it moved anyone."""
        opening = (slug, settings.opening())
        if opening in self.opened:
            return False
        randoms = [repr(random.random()) for _ in range(self.line.store.pre_queue_size(slug) + 16)]
        shuffled = self.line.store.shuffle(slug, settings.opening(), randoms)
        self.opened.add(opening)
        if shuffled > 0:
            log.info("Sales open for %s: %d places of the pre-queue put in a random order", slug, shuffled)
        return shuffled > 0

    def _make_stalled(self, slug, now_ms):
        for place in self.line.store.reclaim(slug, now_ms - self.stalled_ms, now_ms):
            if place.id not in self.in_flight:
                log.warning("Place %s (joined %.0f s ago) has an order begun and never finished; making it again (once)",
                            place.id, (now_ms - place.joined_ms) / 1000)
                self.in_flight.add(place.id)
                gevent.spawn(self._admit, slug, place)

    def _admit(self, slug, place):
        """Make the place's order as POST would have, with its own Idempotency-Key; record the outcome.

        While the database cannot take it (503), the same worker tries again after a pause that doubles
        up to DATABASE_RETRY_MOST: the buyer is at the front of the line and keeps that place.  The key
        makes every attempt the same order; reclaiming after a stall covers a worker that died meanwhile."""
        started = time.perf_counter()
        pause = DATABASE_RETRY_FIRST
        try:
            with self.app.app_context():
                while not self._make_order(slug, place):
                    gevent.sleep(pause * random.uniform(0.5, 1))
                    pause = min(pause * 2, DATABASE_RETRY_MOST)
        except Exception:
            # Left `admitting`: made again (with the same key, so made once) when found stalled.
            log.exception("Making the order of place %s failed; it will be tried again", place.id)
        finally:
            self.answered.setdefault(slug, []).append(time.perf_counter() - started)
            self.in_flight.discard(place.id)

    def _make_order(self, slug, place):
        """True once the place has its outcome (admitted, sold out, refused); False when the database could not take it."""
        store = self.line.store
        try:
            order, _ = orders.create_order(json.loads(place.body), place.order_key)
        except SQLAlchemyError as exc:  # a request would answer it 503 (errors.py): the same here
            db.session.rollback()
            if not database.is_unavailable(exc):
                raise
            return self._not_now(place, database.cause(exc))
        except ApiError as exc:
            if exc.status == 503:  # the database could not take it: nothing was saved or reserved
                return self._not_now(place, exc.code)
            error = {"http_status": exc.status, "code": exc.code, "message": exc.message, "fields": exc.fields}
            status = "sold_out" if exc.code == "sold_out" else "refused"
            store.finish(slug, place.id, status, "error", error)
            metrics.line_admitted.labels(slug, status).inc()
            told = 0
            if exc.code == "sold_out":  # everyone after the same tickets, told at once
                told = store.close(slug, place.type, place.quantity, "sold_out", error)
            elif exc.code == "sales_closed":
                told = store.close(slug, None, 0, "refused", error)
            if told:
                metrics.line_admitted.labels(slug, status).inc(told)
                log.info("%s: %d places in the line told %s at once", slug, told, exc.code)
            return True
        store.finish(slug, place.id, "admitted", "order", order)
        metrics.line_admitted.labels(slug, "admitted").inc()
        return True

    @staticmethod
    def _not_now(place, why):
        """The database could not take the place's order: said, and False (its turn is tried again)."""
        log.warning("Place %s's order could not be made now (%s); it will be tried again", place.id, why)
        return False

    def _publish(self, slug, state, outflow):
        """The line's move, for every held wait of every worker: one message on the event's channel."""
        tick = {"version": state["tick"], **state, "rate": outflow.measured, "share": outflow.share}
        get_hub().publish({"id": service.tick_channel(slug), "status": "line", "version": state["tick"],
                           "updated_at": isoformat(utcnow()), "published_at_ms": int(time.time() * 1000),
                           "order": tick}, quiet=True)
