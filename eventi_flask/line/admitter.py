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

The outflow follows what the service takes, as TCP's congestion control does.  While buyers join much
faster than it serves them (sales open), it grows by a tenth a tick, and eases while the loop runs late:
the joins take CPU too.  Then,
until the line has seen the service crowded, it grows by a third a tick (slow start).  Crowded (the
admitted orders' p90 answer time past CROWDED, or the lead's admission would shed any order): a
twentieth less, and the rate of two ticks before (the one those answers were taken at) is remembered as
the ceiling.  Congested (p90 past SLOW, or the admission would shed half): a fifth less.  One cut per three
ticks: the answers measured in the two after it are of places taken before it.  Below the ceiling the outflow
climbs back quickly to nine tenths of it, then probes above it, faster the longer the answers stay
quick: the service's capacity moves (the arrivals' burst takes CPU, then gives it back).  Capped by
the event's max_rate.
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
# A stored outflow younger than this is a line under way whose lead stopped: the new lead goes on from it.
TAKEOVER_SECONDS = 30
SWEEP_LIMIT = 2000  # places marked left per tick at most
# Pauses between attempts at a place's order while the database answers 503: first, and at most (seconds).
DATABASE_RETRY_FIRST, DATABASE_RETRY_MOST = 0.5, 5.0
IDLE_SECONDS = 60  # an event with an empty line and no joins for this long leaves the active set
# The outflow's control (see the module's docstring), on the p90 of admitted orders' answer time (an order
# answers in 10-150 ms while the service keeps up; past it the reservations queue on the ticket type's row
# and the p90 climbs through 0.3-0.9 s within two ticks): x1.1 up and x0.8 down alone swung the outflow
# between 120 and 300 a second around a capacity of 200 (bench line, 6,000 at 600/s), and from a start of
# 40 it took 15 ticks to reach it.
CROWDED, SLOW, FAST = 0.5, 1.2, 0.5
SLOW_START, CLIMB = 1.3, 1.2  # growth a tick: no ceiling yet; below 0.9 x ceiling
# While buyers join faster than JOINING_FAST x the outflow (sales open), it grows by a tenth a tick at most,
# and eases while the lead's loop runs LAG_WHILE_JOINING late: each join and its first held wait cost a
# worker CPU too, and at an outflow of 150-200 during a burst of 600 joins a second the POSTs were answered
# in 1-3 s (p99), at 50-110 in 150-470 ms; inside the worker a POST's p99 was 40-90 ms while the loop ran
# under 5 ms late, 370-440 ms at 14-35 ms.
WHILE_JOINING, JOINING_FAST, LAG_WHILE_JOINING = 1.1, 2.0, 0.008
PROBE_STEP = 0.03  # above 0.9 x ceiling: 3 % a tick more growth for each tick of quick answers there
EASE, DECREASE, MIN_RATE = 0.95, 0.8, 1.0
CEILING_SHARE = 0.9  # the rate climbed back to quickly, as a share of the ceiling
SHED_CUT = 0.5  # the lead's admission would shed this share of new orders: past capacity, cut
# Places taken and not yet served at most: this many seconds of the outflow (and 4).  A place waits for a
# worker's claim (up to a tick), then for its moment in the tick's spread (up to a tick), then its order's
# answer: at 2 s the cap bound while answers were quick, and the outflow taken swung tick by tick.
IN_FLIGHT_SECONDS = 3.0
WORKER_IN_FLIGHT = 200  # orders one worker makes at once at most
# Weight of the newest tick in the measured serving rate: rising (a forming line's outflow grows a third a
# tick, and its estimates should follow), and falling (slowly: the rate shown falls at most
# RATE_FALL_PER_SECOND too, so an estimate rises gently).
RATE_SMOOTHING_UP, RATE_SMOOTHING_DOWN = 0.5, 0.2
RATE_FALL_PER_SECOND = 0.98
LEARN_AFTER_SECONDS = 30  # a line that has been served this long teaches the next where to start
CEILING_LAG_TICKS = 2  # the answers measured at a tick are those of places taken this many ticks before


class Outflow:
    """How many places one event admits each tick, and the serving rate its estimates use."""

    def __init__(self, start, cap, measured=None, expected=None, rate=None):
        self.cap = cap
        # The rate the service's last line averaged: the rate shown stays at least this until this line has
        # measured its own for LEARN_AFTER_SECONDS.  Its first seconds are the joins' burst, when the outflow
        # is held back (WHILE_JOINING) while those joining are told how long the line will take once it has
        # passed: falling 2 % a second from the learned 136 to 111 during the burst, the rate shown told the
        # last of 6,000 joiners 45 s for a wait of 35 (81 % honest).
        self.expected = expected or 0.0
        self.start = self.rate = self._capped(start)  # a rate the service is known to take: LINE_START_RATE
        if rate:  # a new lead of a line under way: on from the outflow the last lead set, when higher
            self.rate = max(self.rate, self._capped(rate))
        self.ceiling = None  # the rate at which the service was last seen crowded; None: not yet (slow start)
        self.recent_rates = [self.rate]  # the last CEILING_LAG_TICKS + 1 rates, newest last
        self.ticks_since_cut = self.ticks_since_ease = CEILING_LAG_TICKS + 1
        self.probing = 0  # ticks of quick answers since the outflow passed nine tenths of the ceiling
        self.joining = False  # buyers joined faster than JOINING_FAST x the outflow in the last tick
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

    def adjust(self, shed_share, backlog, lag=0.0):
        """One tick's move of the outflow: `shed_share` and `lag` (seconds) from the lead's admission."""
        recent = sorted(self.latencies)
        self.latencies = []
        slow = recent[int(len(recent) * 0.9)] if recent else None
        self.ticks_since_cut += 1
        self.ticks_since_ease += 1
        if shed_share >= SHED_CUT or (slow is not None and slow > SLOW):
            self._crowded(DECREASE)
        elif shed_share > 0 or (slow is not None and slow > CROWDED):
            self._crowded(EASE)
        elif self.joining and lag > LAG_WHILE_JOINING:
            # The joins wait for the loop: a twentieth less (once per two ticks), and no ceiling (it is the joins'
            # CPU, not the orders', that is short: it comes back when they stop).
            # Never below the start: joins alone must not ratchet it down to nothing while thousands wait.
            self.probing = 0
            if self.ticks_since_ease > CEILING_LAG_TICKS:
                self.rate = max(min(self.rate, self.start), self.rate * EASE)
                self.ticks_since_ease = 0
        elif backlog and (slow is None or slow < FAST):
            if self.joining:
                grown = self.rate * WHILE_JOINING
            elif self.ceiling is None:
                grown = self.rate * SLOW_START
            elif self.rate < self.ceiling * CEILING_SHARE:
                grown = min(self.rate * CLIMB, self.ceiling * CEILING_SHARE)
            else:
                # Probing above the ceiling, faster the longer the answers stay quick (as TCP CUBIC does): the
                # ceiling a burst of joins set is far below what the service takes once the burst has passed.
                self.probing += 1
                grown = self.rate * min(1 + PROBE_STEP * self.probing, SLOW_START)
            # Never below the start once the answers are quick: a rate the service is known to take (a burst of
            # joins cut the outflow to a third, and climbing back from the trough left the workers idle).
            self.rate = max(grown + 1, self.start)
        self.rate = self._capped(self.rate)
        self.recent_rates = (self.recent_rates + [self.rate])[-(CEILING_LAG_TICKS + 1):]

    def _capped(self, rate):
        return min(rate, self.cap) if self.cap else rate

    def _crowded(self, by):
        self.probing = 0
        if self.ticks_since_cut <= CEILING_LAG_TICKS:
            return  # these answers are of places taken before the last cut: it is already acted on
        # The answers measured now are those of places taken CEILING_LAG_TICKS ago: that rate was too much.
        self.ceiling = min(self.recent_rates)
        self.rate = max(MIN_RATE, self.rate * by)
        self.ticks_since_cut = 0

    def joined(self, count, seconds):
        """`count` buyers joined the line in the last `seconds`."""
        self.joining = count > JOINING_FAST * self.rate * seconds

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
        weight = RATE_SMOOTHING_UP if rate > self.measured else RATE_SMOOTHING_DOWN
        smoothed = self.measured + (rate - self.measured) * weight
        self.measured = max(smoothed, self.measured * RATE_FALL_PER_SECOND ** seconds)
        if self.serving_seconds < LEARN_AFTER_SECONDS:
            self.measured = max(self.measured, self.expected)
        if served + left:
            self.share += (left / (served + left) - self.share) * RATE_SMOOTHING_DOWN


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
            self.last.pop(slug, None)  # a later lead here starts from the store, not from what it saw then
            if self.outflows.pop(slug, None) is not None:
                metrics.line_length.labels(slug).set(0)  # its new admitter's worker tells the length now
            return
        settings = service.event_line(slug)
        if settings is None:
            return
        outflow = self.outflows.get(slug)
        if outflow is None:
            outflow = self.outflows[slug] = self._new_outflow(store.summary(slug), settings, service.now_ms())
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
            outflow.adjust(admission.shed_share() if admission is not None else 0, backlog=True,
                           lag=admission.lag if admission is not None else 0.0)
            taken = store.take(slug, outflow.budget(seconds, last["admitting"] if last else 0), now_ms)
            for joined_ms in taken:
                metrics.line_wait.observe(max(now_ms - joined_ms, 0) / 1000)
        if not (busy or taken):
            outflow.joining = False
            self._idle(slug, now_ms)
            return
        # One message per tick while anyone waits or is being served: each wait works out its place from it.
        outflow.measure(len(taken), left, seconds)
        average = outflow.average()
        if average is not None and not settings.max_rate:  # a capped line measures its cap, not the service
            store.learn_rate(average)
        state = self.last[slug] = store.advance(slug, outflow.measured, outflow.share, outflow.rate, now_ms)
        if last is not None:  # a first tick sees the whole line as if it had just joined
            outflow.joined(state["length"] - last["length"] + len(taken) + left, seconds)
        self._publish(slug, state, outflow)
        metrics.line_length.labels(slug).set(state["length"])

    def _new_outflow(self, summary, settings, now_ms):
        """The outflow of a line this worker has just begun to lead, from the line's state in the store.

        Taking over a line under way (its lead stopped, or lost the lease), it goes on from the outflow the last
        lead set a moment ago: a new lead does not start the ramp again.  Otherwise (a line forming, or a state
        whose outflow is old: the last sale's, or written by a worker that kept none) it starts from
        LINE_START_RATE, its floor either way.  Its estimates start from the rate the service's last line
        averaged, when higher: at a sale's opening nearly everyone joins within seconds, before the line has
        measured anything (from a start of 40 against a line served at 150-200 a second, 15-20 % of the buyers
        were told a wait within 20 %), while the outflow itself waits for the joins' burst to pass.  So the
        rate shown may be that learned rate while the outflow is far below it: a lead taking over must go on
        from the outflow, not jump to the rate shown during the joins.
        """
        expected = self.line.start_rate()
        if settings.max_rate:  # a capped line is served at its cap at most: so are its estimates
            expected = min(expected, settings.max_rate)
        taken_over = now_ms - summary.get("outflow_ms", 0) <= TAKEOVER_SECONDS * 1000
        return Outflow(self.line.configured_start_rate, settings.max_rate, max(summary["rate"], expected), expected,
                       rate=summary["outflow"] if taken_over else None)

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
