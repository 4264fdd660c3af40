"""Asking PayHero about an order whose callback never came: from every web worker, once per order.

PayHero never sends a callback twice, and one can be lost on the way (a connection reset
under load, issue 24).  Rather than leave the customer watching "waiting" until reconcile's
next run, or for ever where no clock process runs, a pending order with a PayHero reference
is asked about with transaction-status once the M-Pesa prompt has had its time:
PAYHERO_ASK_AFTER[0] seconds (75) after PayHero took the STK push, then at its later steps
while PayHero says it has not processed the payment (QUEUED) or cannot be reached, then every
last gap, until the order is RECONCILE_EXPIRE_AFTER old; reconcile expires it after that, and
stays the backstop for everything else.

Once across workers and instances: when the next ask is due is a column of the order
(`ask_at`, written with PayHero's answer to the push, rows.save_payhero_answer), and a worker
claims the due orders with one guarded UPDATE ... RETURNING that moves `ask_at` past now (FOR
UPDATE SKIP LOCKED on PostgreSQL; SQLite serves one worker and one writer at a time).  Another
worker then finds nothing due.  A worker that stops after claiming loses nothing: its claim
lasts ASK_LEASE, then another worker asks.

The answer goes through reconcile's asking code (reconcile.ask_and_apply): the state machine
as for a callback, under the order's row lock, published like any change, so the held page
learns it.  The order's log (`orders show`) says "no callback after 75 s: asked PayHero: SUCCESS".

Cheap when nothing is due: one indexed query (the earliest `ask_at` of a pending order), then
sleep until then, or until the earliest a push taken after that query could be due
(PAYHERO_ASK_AFTER[0] later), at most IDLE_LOOK seconds.  The database calls go through the
session (SQLite's run off the event loop, sqlite.py), and no connection is held while PayHero
is asked.
"""
import logging
import time
from datetime import timedelta

import gevent
import gevent.pool
from gevent import monkey
from sqlalchemy import bindparam, exists, func, select, update
from sqlalchemy.exc import SQLAlchemyError

from .. import database, metrics
from ..extensions import db
from ..payhero.models import PayheroCallback
from .models import Order, as_utc, utcnow
from .reconcile import ask_and_apply
from .service import add_note
from .state import Status

log = logging.getLogger(__name__)

EXTENSION = "eventi.orders.missed_callbacks"
NOTE = "asked"  # its kind in the order's log (`orders show`)
# A claimed order is left to its worker this long; should that worker stop mid-ask, another asks then.
ASK_LEASE = 30.0
# Longest sleep with nothing due: how late a changed PAYHERO_ASK_AFTER, or another instance's clock, is noticed.
IDLE_LOOK = 15.0
# After a look that found due orders other workers took, or a failed one: the next look.
BUSY_LOOK = 1.0
DATABASE_AWAY_LOOK = 5.0  # while the database cannot be reached (DatabaseWatch logs the outage once)
CLAIM_BATCH = 100  # orders claimed per statement
ASKING_AT_ONCE = 20  # PayHero calls in flight per worker

ORDERS = Order.__table__
_PENDING = ORDERS.c.status == Status.PENDING.value
_EARLIEST_DUE = select(func.min(ORDERS.c.ask_at)).where(_PENDING, ORDERS.c.ask_at.is_not(None))
_DUE = (select(ORDERS.c.id).where(_PENDING, ORDERS.c.ask_at <= bindparam("now"))
        .order_by(ORDERS.c.ask_at).limit(CLAIM_BATCH).with_for_update(skip_locked=True))
_CLAIM = (update(ORDERS).where(ORDERS.c.id.in_(_DUE.scalar_subquery()), _PENDING)
          .values(ask_at=bindparam("lease_until"), asks=ORDERS.c.asks + 1)
          .returning(ORDERS.c.id, ORDERS.c.payhero_reference, ORDERS.c.asks, ORDERS.c.created_at))
_RESCHEDULE = (update(ORDERS).where(ORDERS.c.id == bindparam("order_id"), _PENDING,
                                    ORDERS.c.asks == bindparam("claimed_asks"))
               .values(ask_at=bindparam("next_at")))
_HAD_CALLBACK = select(exists().where(PayheroCallback.__table__.c.order_id == bindparam("order_id")))


def init_app(app):
    """Start this worker's asking loop; only under gevent (the web workers), not in the flask CLI."""
    if not app.config["PAYHERO_ASK_AFTER"] or not monkey.is_module_patched("socket"):
        return
    app.extensions[EXTENSION] = asker = MissedCallbacks(app)
    asker.start()


def stop(app):
    """Stop this worker's loop (reconcile, or another worker, asks instead)."""
    asker = app.extensions.pop(EXTENSION, None)
    if asker is not None:
        asker.stop()


class MissedCallbacks:
    def __init__(self, app):
        self.app = app
        self.schedule = app.config["PAYHERO_ASK_AFTER"]
        self.expire_after = app.config["RECONCILE_EXPIRE_AFTER"]
        self._greenlet = None
        self._asking = gevent.pool.Pool(ASKING_AT_ONCE)

    def start(self):
        # The first look a moment after start-up (the app may still be setting up), soon enough for
        # orders that fell due while no worker ran.
        self._greenlet = gevent.spawn_later(min(self.schedule[0], IDLE_LOOK), self._run)

    def stop(self):
        self._asking.kill(block=False)
        if self._greenlet is not None:
            self._greenlet.kill(block=False)

    def _run(self):
        failing = False
        while True:
            try:
                with self.app.app_context():
                    pause = database.unless_unavailable(self.ask_due, default=DATABASE_AWAY_LOOK)
                failing = False
            except Exception:  # a bug of ours: say so once while it lasts, and look again later
                if not failing:
                    log.exception("Asking PayHero about orders with no callback failed")
                failing, pause = True, None
            gevent.sleep(BUSY_LOOK if pause is None else pause)

    def ask_due(self):
        """Ask PayHero about every order due now, once; seconds until the next look."""
        now = utcnow()
        # On the callbacks' connections, as each ask: this settles what a lost callback would have,
        # and buyers holding every connection of the app's pool at sales open must not delay it.
        with database.on_callbacks_engine():
            try:
                earliest = db.session.execute(_EARLIEST_DUE).scalar()
                db.session.commit()
                if earliest is None or as_utc(earliest) > now:
                    next_push_due = now + timedelta(seconds=self.schedule[0])
                    due = min(as_utc(earliest), next_push_due) if earliest is not None else next_push_due
                    return min(max((due - now).total_seconds(), 0.05), IDLE_LOOK)
                claimed = db.session.execute(_CLAIM, {"now": now, "lease_until": now + timedelta(seconds=ASK_LEASE)}).all()
                db.session.commit()
            finally:
                db.session.remove()  # no connection held while PayHero is asked
        for order_id, reference, asks, created_at in claimed:
            self._asking.spawn(self._ask_in_context, order_id, reference, asks, as_utc(created_at))
        self._asking.join()
        return 0 if claimed else BUSY_LOOK  # more may be due; or others took these

    def _ask_in_context(self, order_id, reference, asks, created_at):
        with self.app.app_context(), database.on_callbacks_engine():
            try:
                self.ask(order_id, reference, asks, created_at)
            except SQLAlchemyError as exc:  # the claim's lease runs out and the order is asked about again
                log.warning("Asking PayHero about order %s: the database failed: %s", order_id, database.cause(exc))
            except Exception:
                log.exception("Asking PayHero about order %s failed", order_id)
            finally:
                db.session.remove()

    def ask(self, order_id, reference, asks, created_at):
        """Ask PayHero about one claimed order and apply its answer; reschedule the next ask if it gave none."""
        started = time.monotonic()
        if asks == 1:
            had_callback = db.session.execute(_HAD_CALLBACK, {"order_id": order_id}).scalar()
            db.session.commit()
            if not had_callback:
                metrics.callbacks_missing.inc()
            # A stored callback not applied (one PayHero did not confirm, payhero/verify.py) is no missing one.
            summary = f"{'callback not applied' if had_callback else 'no callback'} after {self.schedule[0]:g} s"
        else:
            summary = f"ask {asks}, {(utcnow() - created_at).total_seconds():.0f} s after the order"
        transition, check = ask_and_apply(order_id, reference, NOTE, {"ask": asks, "summary": summary})
        said = check.get("status") or f"could not ask ({check.get('error')})"
        if transition is not None and transition.changes:
            metrics.payments_asked.labels(transition.status.value).inc()
            log.info("Order %s: %s: asked PayHero: %s: settled %s (%.1fs)", order_id, summary, said,
                     transition.status.value, time.monotonic() - started)
            return
        # No outcome yet (QUEUED, PayHero not reached), or one that changes nothing (an amount that
        # does not match): asked again later while the order is pending.
        outcome = "unchanged" if transition is not None else "error" if "error" in check else "pending"
        metrics.payments_asked.labels(outcome).inc()
        next_at = self._next_ask(asks, created_at)
        result = f"asking again in {(next_at - utcnow()).total_seconds():.0f} s" if next_at else "left to reconcile"
        if db.session.execute(_RESCHEDULE, {"order_id": order_id, "claimed_asks": asks, "next_at": next_at}).rowcount:
            add_note(order_id, NOTE, {**check, "result": result})
        db.session.commit()
        log.info("Order %s: %s: asked PayHero: %s: %s", order_id, summary, said, result)

    def _next_ask(self, asks, created_at):
        """When to ask again after the `asks`-th ask gave no answer: the schedule's next step (or the
        last gap again), or None once the order is old enough for reconcile to expire it."""
        schedule = self.schedule
        if asks < len(schedule):
            gap = schedule[asks] - schedule[asks - 1]
        else:
            gap = schedule[-1] - schedule[-2] if len(schedule) > 1 else schedule[-1]
        next_at = utcnow() + timedelta(seconds=max(gap, BUSY_LOOK))
        if next_at > created_at + timedelta(seconds=self.expire_after):
            return None
        return next_at
