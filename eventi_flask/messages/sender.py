"""The sender: takes due messages from the outbox, sends them, records what happened.

Several senders (every web worker, every instance, a `worker:` process) may run against one
database.  Each message is claimed before it is sent by one guarded UPDATE that moves its
`next_attempt_at` past a lease (on PostgreSQL over rows picked FOR UPDATE SKIP LOCKED, so senders
never queue on each other): only one sender gets it.  The outcome is recorded afterwards; a sender
that dies between the two leaves the message to be claimed again when the lease ends, so it may be
sent twice, never lost.  A failure the provider may get over is tried again after a delay that
doubles (MESSAGES_RETRY) for MESSAGES_RETRY_FOR; a refusal for good is marked failed at once.

It runs as one greenlet woken right after a commit that queued messages (service.py), and every
MESSAGES_SWEEP_INTERVAL for retries that came due and messages queued by other processes.
"""
import logging
import random
import time
from datetime import timedelta

import gevent
import gevent.event
import gevent.pool
from sqlalchemy import Integer, bindparam, func, select, update
from sqlalchemy.exc import SQLAlchemyError

from .. import metrics
from ..clock import as_utc, utcnow
from ..database import cause, is_unavailable
from ..extensions import db
from . import texts
from .delivery import SendFailed
from .email import SmtpMailer
from .models import FAILED, PENDING, SENT, OutboxMessage
from .service import MESSAGES, read_ticket
from .sms import AfricasTalking

log = logging.getLogger(__name__)

CONCURRENCY = 20  # messages sent at once by one sender: each waits on its provider most of its time
# In a web worker, fewer at once, and none while its event loop runs late: an email is ~5 ms of CPU (its QR
# codes, MIME), and 20 of them back to back held the loop 100 ms, long enough for admission to shed buyers.
WEB_CONCURRENCY = 4
LOOP_LATE = 0.02  # seconds: as ORDER_SHED_LAG's first step
BUYERS_FIRST_FOR = 30.0  # seconds a web worker's sender waits for its loop to catch up before it sends anyway
# A claimed message is another sender's to take after this long: more than one send can take (SMTP's
# and Africa's Talking's timeouts), so a slow send is not sent twice.
LEASE = timedelta(seconds=300)
CHANNEL_NAMES = {"sms": "SMS", "email": "Email"}

_DUE = (MESSAGES.c.state == PENDING, MESSAGES.c.next_attempt_at <= bindparam("now"))


def _claim_statement(*where):
    picked = (select(MESSAGES.c.id).where(*_DUE, *where).order_by(MESSAGES.c.next_attempt_at)
              .limit(bindparam("batch", type_=Integer))
              .with_for_update(skip_locked=True))  # SQLite has one writer at a time and no FOR UPDATE
    return (update(MESSAGES).where(MESSAGES.c.id.in_(picked.scalar_subquery()), *_DUE)
            .values(next_attempt_at=bindparam("lease_until"), attempts=MESSAGES.c.attempts + 1)
            .returning(MESSAGES.c.id, MESSAGES.c.order_id, MESSAGES.c.channel, MESSAGES.c.recipient,
                       MESSAGES.c.attempts, MESSAGES.c.created_at))


_CLAIM = _claim_statement()
_CLAIM_FOR_ORDER = _claim_statement(MESSAGES.c.order_id == bindparam("for_order"))
# Only the claim that sent it records the outcome: a message claimed again since (its lease ended) is the new claim's.
_RECORD = update(MESSAGES).where(MESSAGES.c.id == bindparam("message_id"), MESSAGES.c.state == PENDING,
                                 MESSAGES.c.attempts == bindparam("claimed_attempts"))
_PENDING = select(func.count(), func.min(MESSAGES.c.created_at)).where(MESSAGES.c.state == PENDING)


class Sender:
    """One per process.  `sending`: False in web workers when a `worker:` process sends (MESSAGES_SENDER=process);
    they then only keep the pending gauges up to date."""

    def __init__(self, app, sending, in_web_worker=False):
        self.app = app
        self.sending = sending
        self.in_web_worker = in_web_worker
        self.batch = WEB_CONCURRENCY if in_web_worker else CONCURRENCY
        config = app.config
        self.retry_first, self.retry_longest = config["MESSAGES_RETRY"]
        self.retry_for = timedelta(seconds=config["MESSAGES_RETRY_FOR"])
        self.interval = config["MESSAGES_SWEEP_INTERVAL"]
        self.sms = AfricasTalking(config) if config["SMS_MODE"] != "off" else None
        self.mailer = SmtpMailer(config) if config["SMTP_URL"] else None
        self._woken = gevent.event.Event()
        self._greenlet = None
        self._sending = gevent.pool.Pool(self.batch)
        self._database_down = False

    # -- running --
    def wake(self):
        """Messages were queued in this process: send them now rather than at the next sweep."""
        self._woken.set()

    def start(self):
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self.run_forever)
        return self

    def stop(self):
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
        self._sending.kill()

    def run_forever(self):
        next_gauges = 0.0
        while True:
            self._woken.clear()
            with self.app.app_context():
                try:
                    if self.sending:
                        self.send_due()
                    if time.monotonic() >= next_gauges:
                        self.refresh_gauges()
                        next_gauges = time.monotonic() + self.interval
                    self._database_is(up=True)
                except Exception as exc:
                    if isinstance(exc, SQLAlchemyError) and is_unavailable(exc):
                        self._database_is(up=False, reason=cause(exc))
                    else:  # a bug of ours: said, and the next round tries again
                        log.exception("Messages: sending failed")
                finally:
                    db.session.remove()
            self._woken.wait(self.interval)

    def _database_is(self, up, reason=None):
        if up and self._database_down:
            log.info("Messages: the database answers again; sending")
        elif not up and not self._database_down:
            log.warning("Messages: the database cannot be reached (%s); trying again every %gs", reason, self.interval)
        self._database_down = not up

    # -- one round --
    def send_due(self, order_id=None):
        """Claim and send every due message (only `order_id`'s when given), CONCURRENCY at a time; how many."""
        sent = 0
        while True:
            if self.in_web_worker:
                self._after_the_buyers()
            claimed = self._claim(order_id)
            for message in claimed:
                self._sending.spawn(self._deliver, message)
            self._sending.join()
            sent += len(claimed)
            if len(claimed) < self.batch:
                return sent

    def _after_the_buyers(self):
        """Wait while this worker's event loop runs late (a sale opening), up to BUYERS_FIRST_FOR: the buyers'
        orders and callbacks come first, the messages a few seconds later."""
        deadline = time.monotonic() + BUYERS_FIRST_FOR
        while time.monotonic() < deadline:
            started = time.perf_counter()
            gevent.sleep(0.001)
            if time.perf_counter() - started - 0.001 < LOOP_LATE:
                return
            gevent.sleep(0.25)

    def _claim(self, order_id):
        now = utcnow()
        try:
            # Only the statement's own parameters: another column's name would be SET (UPDATE's extra values).
            params = {"now": now, "lease_until": now + LEASE, "batch": self.batch}
            if order_id is not None:
                params["for_order"] = order_id
            claimed = db.session.execute(_CLAIM if order_id is None else _CLAIM_FOR_ORDER, params).mappings().all()
            db.session.commit()
        except SQLAlchemyError:
            db.session.rollback()
            raise
        return claimed

    def _deliver(self, message):
        """Send one claimed message and record the outcome; never raises (a database failure leaves it claimed:
        it is sent again once its lease ends)."""
        with self.app.app_context():
            try:
                provider_id = self._send(message)
            except SendFailed as exc:
                self._record_failure(message, str(exc), exc.permanent)
            except SQLAlchemyError as exc:
                if not is_unavailable(exc):
                    raise
                # The database is away or every pooled connection busy (a sale opening): the message stays
                # claimed and is taken again when its lease ends.  Not a bug: no traceback.
                log.warning("The %s for order %s waits for the database (%s); sent once its claim ends",
                            CHANNEL_NAMES[message["channel"]], message["order_id"], cause(exc))
            except Exception as exc:  # a bug of ours: tried again, as a provider's failure would be
                log.exception("Sending the %s for order %s failed", message["channel"], message["order_id"])
                self._record_failure(message, f"internal error: {type(exc).__name__}", permanent=False)
            else:
                self._record(message, "sent", state=SENT, sent_at=utcnow(), provider_message_id=provider_id,
                             last_error=None)
                log.info("%s for order %s sent%s", CHANNEL_NAMES[message["channel"]], message["order_id"],
                         f" ({provider_id})" if provider_id else "")
            finally:
                db.session.remove()

    def _send(self, message):
        from ..web.ticket_links import ticket_url  # the web package imports the orders service, which imports us

        try:
            ticket = read_ticket(message["order_id"])
        finally:
            db.session.commit()  # no connection held while the provider answers
        if ticket is None:
            raise SendFailed("the order is gone", permanent=True)
        link = ticket_url(ticket.order_id)
        if message["channel"] == "sms":
            if self.sms is None:
                raise SendFailed("SMS_MODE is off")
            return self.sms.send(message["recipient"], texts.sms_text(ticket.event_name, ticket.quantity,
                                                                      ticket.receipt, link))
        if self.mailer is None:
            raise SendFailed("SMTP_URL is not set")
        return self.mailer.send(message["recipient"], ticket, link)

    def _record_failure(self, message, reason, permanent):
        name, order_id = CHANNEL_NAMES[message["channel"]], message["order_id"]
        if not permanent and utcnow() - as_utc(message["created_at"]) < self.retry_for:
            delay = self.retry_delay(message["attempts"])
            self._record(message, "retried", next_attempt_at=utcnow() + timedelta(seconds=delay), last_error=reason)
            log.info("%s for order %s not sent (attempt %d), trying again in %.0fs: %s", name, order_id,
                     message["attempts"], delay, reason)
            return
        self._record(message, "failed", state=FAILED, last_error=reason)
        why = "refused for good" if permanent else f"still failing after {self.retry_for.total_seconds() / 3600:g} h"
        log.warning("%s for order %s failed, %s: %s", name, order_id, why, reason)

    def retry_delay(self, attempts):
        """Seconds before attempt `attempts` + 1: doubling from the first delay up to the longest, +-10% so that
        messages failed together (a provider outage) do not all come back at once."""
        delay = min(self.retry_first * 2 ** max(attempts - 1, 0), self.retry_longest)
        return delay * random.uniform(0.9, 1.1)

    def _record(self, message, outcome, **values):
        try:
            recorded = db.session.execute(_RECORD.values(**values), {"message_id": message["id"],
                                                                     "claimed_attempts": message["attempts"]})
            db.session.commit()
        except SQLAlchemyError as exc:
            db.session.rollback()
            log.warning("%s for order %s: its outcome (%s) could not be recorded (%s); it will be sent again",
                        CHANNEL_NAMES[message["channel"]], message["order_id"], outcome, type(exc).__name__)
            return
        if recorded.rowcount == 1:
            metrics.messages.labels(message["channel"], outcome).inc()

    def refresh_gauges(self):
        """eventi_outbox_pending and the age of the oldest pending message, in one query."""
        count, oldest = db.session.execute(_PENDING).one()
        db.session.commit()
        metrics.outbox_pending.set(count)
        metrics.outbox_oldest_pending.set((utcnow() - as_utc(oldest)).total_seconds() if oldest else 0)
