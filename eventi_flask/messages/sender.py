"""The sender: takes due messages from the outbox in batches, sends them, records what happened.

Several senders (every web worker, every instance, a `worker:` process) may run against one
database.  Messages are claimed before they are sent, up to BATCH at once, by one guarded UPDATE
that moves their `next_attempt_at` past a lease (on PostgreSQL over rows picked FOR UPDATE SKIP
LOCKED, so senders never queue on each other): only one sender gets each.  The outcomes are recorded
afterwards, each only if its claim still holds; a sender that dies between the two leaves its messages
to be claimed again when the lease ends, so they may be sent twice, never lost.  A failure the
provider may get over is tried again after a delay that doubles (MESSAGES_RETRY) for
MESSAGES_RETRY_FOR; a refusal for good is marked failed at once.

The database work is per batch, not per message: one claim and two reads (the orders with their
event, the ticket codes) in one transaction, then no connection while the providers answer, then
one lock of the still-held claims and one executemany UPDATE for every outcome, in one commit.

It runs as one greenlet woken right after a commit that queued messages (service.py), which first
waits GATHER for the other completions of a busy moment to be claimed with it, and every
MESSAGES_SWEEP_INTERVAL for retries that came due and messages queued by other processes.
"""
import logging
import random
import time
from dataclasses import dataclass, field
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
from .service import MESSAGES, read_tickets
from .sms import AfricasTalking

log = logging.getLogger(__name__)

# A woken sender waits this long before it claims: at a sale's opening the orders completed meanwhile (200 a
# second) are then claimed, read and recorded together rather than a round each.  Well inside the 5 s a
# message has to leave.
GATHER = 0.3  # seconds
BATCH = 100  # messages claimed at once
CONCURRENCY = 20  # messages sent at once by one sender: each waits on its provider most of its time
# In a web worker, fewer at once, and none while its event loop runs late: an email is ~5 ms of CPU (its QR
# codes, MIME), and 20 of them back to back held the loop 100 ms, long enough for admission to shed buyers.
WEB_CONCURRENCY = 4
LOOP_LATE = 0.02  # seconds: as ORDER_SHED_LAG's first step
BUYERS_FIRST_FOR = 30.0  # seconds a web worker's sender waits for its loop to catch up before it sends anyway
# A claimed message is another sender's to take after this long: more than one send can take (SMTP's
# and Africa's Talking's timeouts), so a slow send is not sent twice.
LEASE = timedelta(seconds=300)
# The longest one send can take: SMTP's 20 s timeout on each of its exchanges (connect, EHLO, STARTTLS, EHLO,
# login, MAIL, RCPT, DATA).  A batch whose providers hang starts no send later than this before its lease
# ends; the messages it did not start are given back, due at once.
LONGEST_SEND = timedelta(seconds=180)
# A long batch (providers answering slowly) records its outcomes this often, so that a worker stopped
# mid-batch sends again only what it sent since.
RECORD_EVERY = 1.0  # seconds
CHANNEL_NAMES = {"sms": "SMS", "email": "Email"}

_DUE = (MESSAGES.c.state == PENDING, MESSAGES.c.next_attempt_at <= bindparam("now"))


def _claim_statement(*where):
    # Picked once, in a CTE kept MATERIALIZED: as an IN (subquery), PostgreSQL's planner may rescan the locking
    # subquery for each due row (a nested-loop semi join), and each rescan skips the rows just claimed and picks
    # the next ones, so the LIMIT held nothing back (measured: 500 due rows, all 500 claimed at once, in 80 ms).
    picked = (select(MESSAGES.c.id).where(*_DUE, *where).order_by(MESSAGES.c.next_attempt_at)
              .limit(bindparam("batch", type_=Integer))
              .with_for_update(skip_locked=True)  # SQLite has one writer at a time and no FOR UPDATE
              .cte("picked").prefix_with("MATERIALIZED"))
    return (update(MESSAGES).where(MESSAGES.c.id == picked.c.id, *_DUE)
            .values(next_attempt_at=bindparam("lease_until"), attempts=MESSAGES.c.attempts + 1)
            .returning(MESSAGES.c.id, MESSAGES.c.order_id, MESSAGES.c.channel, MESSAGES.c.recipient,
                       MESSAGES.c.attempts, MESSAGES.c.created_at))


_CLAIM = _claim_statement()
_CLAIM_FOR_ORDER = _claim_statement(MESSAGES.c.order_id == bindparam("for_order"))
# Only the claim that sent a message records its outcome: one claimed again since (its lease ended) is the new
# claim's.  The claims still held are locked first (their ids and attempts), so that what is counted as recorded
# is exactly what was; the UPDATEs keep the guard all the same.
_HELD = (select(MESSAGES.c.id, MESSAGES.c.attempts)
         .where(MESSAGES.c.id.in_(bindparam("ids", expanding=True)), MESSAGES.c.state == PENDING)
         .with_for_update())
_GUARD = (MESSAGES.c.id == bindparam("message_id"), MESSAGES.c.state == PENDING,
          MESSAGES.c.attempts == bindparam("claimed_attempts"))
# Every outcome in one executemany: parameters named apart from the columns (a column's name would be SET too).
_RECORD = update(MESSAGES).where(*_GUARD).values(
    state=bindparam("new_state"), last_error=bindparam("error"), provider_message_id=bindparam("provider_id"),
    sent_at=bindparam("sent", type_=MESSAGES.c.sent_at.type),
    # Only a retry moves the next attempt; a sent or failed message keeps its claim's.
    next_attempt_at=func.coalesce(bindparam("retry_at", type_=MESSAGES.c.next_attempt_at.type),
                                  MESSAGES.c.next_attempt_at))
# A claimed message whose send never started: due again at once, as if never claimed.
_RELEASE = update(MESSAGES).where(*_GUARD).values(next_attempt_at=bindparam("due"), attempts=MESSAGES.c.attempts - 1)
_PENDING = select(func.count(), func.min(MESSAGES.c.created_at)).where(MESSAGES.c.state == PENDING)


@dataclass
class _Outcome:
    """What became of one claimed message: `outcome` is the metric's (sent, retried, failed); `values` the row's."""

    message: dict
    outcome: str
    values: dict


@dataclass
class _Batch:
    """One claim's messages and their tickets, taken in turn by the sending greenlets, and their outcomes."""

    messages: list
    tickets: dict
    last_start: float  # time.monotonic() after which no send starts: its claim could end before it does
    started: int = 0  # messages[:started] are taken
    outcomes: list = field(default_factory=list)  # not recorded yet

    def next_message(self):
        if self.started >= len(self.messages) or time.monotonic() > self.last_start:
            return None
        self.started += 1
        return self.messages[self.started - 1]

    def take_outcomes(self):
        outcomes, self.outcomes = self.outcomes, []
        return outcomes


class Sender:
    """One per process.  `sending`: False in web workers when a `worker:` process sends (MESSAGES_SENDER=process);
    they then only keep the pending gauges up to date."""

    def __init__(self, app, sending, in_web_worker=False):
        self.app = app
        self.sending = sending
        self.in_web_worker = in_web_worker
        self.concurrency = WEB_CONCURRENCY if in_web_worker else CONCURRENCY
        config = app.config
        self.retry_first, self.retry_longest = config["MESSAGES_RETRY"]
        self.retry_for = timedelta(seconds=config["MESSAGES_RETRY_FOR"])
        self.interval = config["MESSAGES_SWEEP_INTERVAL"]
        self.sms = AfricasTalking(config) if config["SMS_MODE"] != "off" else None
        self.mailer = SmtpMailer(config) if config["SMTP_URL"] else None
        self._woken = gevent.event.Event()
        self._greenlet = None
        self._sending = gevent.pool.Pool(self.concurrency)
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
        self._sending.kill()  # first: the batch they leave records what they sent
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None

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
            if self._woken.wait(self.interval) and self.sending:
                gevent.sleep(GATHER)  # the wakes meanwhile are this round's: their commits came before its claim

    def _database_is(self, up, reason=None):
        if up and self._database_down:
            log.info("Messages: the database answers again; sending")
        elif not up and not self._database_down:
            log.warning("Messages: the database cannot be reached (%s); trying again every %gs", reason, self.interval)
        self._database_down = not up

    # -- one round --
    def send_due(self, order_id=None):
        """Claim and send every due message (only `order_id`'s when given), BATCH at a time; how many."""
        handled = 0
        while True:
            if self.in_web_worker:
                self._after_the_buyers()
            batch = self._claim(order_id)
            if batch.messages:
                self._send(batch)
            handled += len(batch.messages)
            if len(batch.messages) < BATCH:
                return handled

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
        """Claim up to BATCH due messages and read their orders' tickets, in one transaction: a read that fails
        (the pool exhausted at a sale's opening) gives the claim back rather than leaving it to its lease."""
        now = utcnow()
        try:
            # Only the statement's own parameters: another column's name would be SET (UPDATE's extra values).
            params = {"now": now, "lease_until": now + LEASE, "batch": BATCH}
            if order_id is not None:
                params["for_order"] = order_id
            messages = db.session.execute(_CLAIM if order_id is None else _CLAIM_FOR_ORDER, params).mappings().all()
            tickets = read_tickets({message["order_id"] for message in messages}) if messages else {}
            db.session.commit()  # no connection held while the providers answer
        except SQLAlchemyError:
            db.session.rollback()
            raise
        last_start = time.monotonic() + (LEASE - LONGEST_SEND).total_seconds()
        return _Batch(messages=messages, tickets=tickets, last_start=last_start)

    def _send(self, batch):
        """Send the batch, `concurrency` at a time, recording the outcomes as they come (every RECORD_EVERY) and
        giving back the messages whose claim would end before their send could."""
        lanes = [self._sending.spawn(self._lane, batch) for _ in range(min(self.concurrency, len(batch.messages)))]
        while len(gevent.joinall(lanes, timeout=RECORD_EVERY)) < len(lanes):
            self._record(batch.take_outcomes())
        self._record(batch.take_outcomes(), unstarted=batch.messages[batch.started:])

    def _lane(self, batch):
        """One greenlet's share of the batch: the next message not yet taken, until none is left."""
        with self.app.app_context():  # the ticket link is signed with the app's secret
            while (message := batch.next_message()) is not None:
                outcome = self._attempt(message, batch.tickets.get(message["order_id"]))
                batch.outcomes.append(outcome)  # to the list as it is now: a record may have taken it meanwhile
                gevent.sleep(0)  # the SMS sandbox never waits: let the loop's waits and callbacks in between

    def _attempt(self, message, ticket):
        """Send one claimed message; its _Outcome, said in the log.  Never raises."""
        try:
            provider_id = self._hand_over(message, ticket)
        except SendFailed as exc:
            return self._failure(message, str(exc), exc.permanent)
        except Exception as exc:  # a bug of ours: tried again, as a provider's failure would be
            log.exception("Sending the %s for order %s failed", message["channel"], message["order_id"])
            return self._failure(message, f"internal error: {type(exc).__name__}", permanent=False)
        log.info("%s for order %s sent%s", CHANNEL_NAMES[message["channel"]], message["order_id"],
                 f" ({provider_id})" if provider_id else "")
        return _Outcome(message, "sent", {"new_state": SENT, "sent": utcnow(), "provider_id": provider_id,
                                          "error": None, "retry_at": None})

    def _hand_over(self, message, ticket):
        from ..web.ticket_links import ticket_url  # the web package imports the orders service, which imports us

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

    def _failure(self, message, reason, permanent):
        name, order_id = CHANNEL_NAMES[message["channel"]], message["order_id"]
        unchanged = {"provider_id": None, "sent": None, "error": reason}
        if not permanent and utcnow() - as_utc(message["created_at"]) < self.retry_for:
            delay = self.retry_delay(message["attempts"])
            log.info("%s for order %s not sent (attempt %d), trying again in %.0fs: %s", name, order_id,
                     message["attempts"], delay, reason)
            return _Outcome(message, "retried", {**unchanged, "new_state": PENDING,
                                                 "retry_at": utcnow() + timedelta(seconds=delay)})
        why = "refused for good" if permanent else f"still failing after {self.retry_for.total_seconds() / 3600:g} h"
        log.warning("%s for order %s failed, %s: %s", name, order_id, why, reason)
        return _Outcome(message, "failed", {**unchanged, "new_state": FAILED, "retry_at": None})

    def retry_delay(self, attempts):
        """Seconds before attempt `attempts` + 1: doubling from the first delay up to the longest, +-10% so that
        messages failed together (a provider outage) do not all come back at once."""
        delay = min(self.retry_first * 2 ** max(attempts - 1, 0), self.retry_longest)
        return delay * random.uniform(0.9, 1.1)

    def _record(self, outcomes, unstarted=()):
        """Record `outcomes` and give back `unstarted`, those whose claim still holds, in one transaction."""
        if not outcomes and not unstarted:
            return
        claims = [outcome.message for outcome in outcomes] + list(unstarted)
        try:
            attempts = dict(db.session.execute(_HELD, {"ids": [message["id"] for message in claims]}).all())
            held = [outcome for outcome in outcomes if attempts.get(outcome.message["id"]) == outcome.message["attempts"]]
            if held:
                db.session.execute(_RECORD, [{**outcome.values, "message_id": outcome.message["id"],
                                              "claimed_attempts": outcome.message["attempts"]} for outcome in held])
            given_back = [{"message_id": message["id"], "claimed_attempts": message["attempts"], "due": utcnow()}
                          for message in unstarted if attempts.get(message["id"]) == message["attempts"]]
            if given_back:
                db.session.execute(_RELEASE, given_back)
            db.session.commit()
        except SQLAlchemyError as exc:
            db.session.rollback()
            for outcome in outcomes:
                log.warning("%s for order %s: its outcome (%s) could not be recorded (%s); it will be sent again",
                            CHANNEL_NAMES[outcome.message["channel"]], outcome.message["order_id"], outcome.outcome,
                            type(exc).__name__)
            return
        for outcome in held:
            metrics.messages.labels(outcome.message["channel"], outcome.outcome).inc()
        if unstarted:
            log.warning("Messages: %d claimed message(s) not started before their claim could end (the providers are "
                        "slow); due again at once", len(given_back))

    def refresh_gauges(self):
        """eventi_outbox_pending and the age of the oldest pending message, in one query."""
        count, oldest = db.session.execute(_PENDING).one()
        db.session.commit()
        metrics.outbox_pending.set(count)
        metrics.outbox_oldest_pending.set((utcnow() - as_utc(oldest)).total_seconds() if oldest else 0)
