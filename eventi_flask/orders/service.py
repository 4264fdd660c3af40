"""The orders service layer: each public function owns its transaction."""
import hashlib
import json
import logging
import re
import secrets
import time
from datetime import timedelta

from flask import current_app
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm.exc import StaleDataError

from .. import database, metrics
from ..errors import ApiError, database_unavailable
from ..events import service as events
from ..extensions import db
from ..messages import service as messages
from ..notify.hub import WaitLimitReached
from ..notify.service import get_hub, notify_after_commit
from ..payhero.client import PayHeroError, get_payhero
from . import rows
from .admission import reservation_timed
from .models import Order, OrderLogEntry, new_order_id, utcnow
from .schemas import order_body, serialize_order
from .state import (PLAIN_REASONS, RESULT_IN_PROGRESS, RESULT_NOT_PERMITTED, RESULT_PROMPT_NOT_SENT,
                    RESULT_RULE_LIMITED, RESULT_SYSTEM_ERROR, Decision, Status, decide_payment,
                    result_code_for_message)

log = logging.getLogger(__name__)

# What we issue, and no more: anything else is unknown without asking the database
# (PostgreSQL refuses some characters, such as NUL, with an error rather than "not found").
ORDER_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")


def order_not_found():
    return ApiError(404, "order_not_found", "No order with that id.")


def order_by_id(order_id):
    order = _read_order(order_id)
    if order is None:
        raise order_not_found()
    return order


def _row_body(row, connection=None):
    """The order's body from its row; a completed order's ticket codes are read on `connection` (or the session's)."""
    if row["status"] != Status.COMPLETED:
        return order_body(row)
    return order_body(row, rows.ticket_codes(connection or db.session.connection(), row["id"]))


def _touch(order):
    """Every committed change bumps the version and is published after the commit."""
    order.version += 1
    order.updated_at = utcnow()
    notify_after_commit(db.session, serialize_order(order))


def create_order(data, key=None):
    """Reserve tickets and save a pending order, then ask PayHero for the STK push.

    The reservation and the order are one statement (rows.create_order), committed on
    its own on PostgreSQL: the ticket type's row is what every buyer of a ticket drop
    queues on, and its lock lasts no longer than that statement inside the server.

    `key`: the request's Idempotency-Key, or None.  It is claimed in that same statement;
    when an earlier request made an order with it, that order is answered instead.
    Returns (order body, replayed); an earlier request's error is raised again, as it was.
    """
    claim = None if key is None else {"value": key, "body_hash": body_hash(data),
                                      "expired_before": utcnow() - IDEMPOTENCY_KEY_TTL}
    for _ in range(CLAIM_ATTEMPTS):
        order = _new_order(data)
        created = _reserve(order, data, claim)
        if created is not None:
            order.update(created, event_slug=data["event"], ticket_type_code=data["ticket_type"], payhero_reference=None,
                         checkout_request_id=None, receipt=None, result_code=None, result_desc=None, refund_due=False)
            # Saved before PayHero is called: its callback may arrive before its answer does.
            return _request_payment(order, key), False
        if claim is None:
            _refuse_order(data, order["created_at"])
        first = _first_answer_for(claim, order, data)
        if first is not None:
            return first, True
    # The key's claim kept vanishing under us: its first request is giving up too.
    raise database_unavailable(ORDER_NOT_SAVED)


def _new_order(data):
    now = utcnow()
    return {"id": new_order_id(), "status": Status.PENDING.value, "version": 1, "quantity": data["quantity"],
            "name": data["name"].strip(), "email": data["email"], "phone": data["phone"],
            "created_at": now, "updated_at": now}


def _reserve(order, data, claim):
    """rows.create_order, committed; None when nothing was written.  A database failure is a 503
    that leaves no tickets held and no key claimed."""
    try:
        with reservation_timed():  # queueing on the ticket type's row shows here, and sheds (admission.py)
            created = rows.create_order(_single_statement_bind(), order, data["event"], data["ticket_type"], claim)
            db.session.commit()
    except DBAPIError:
        db.session.rollback()
        # The statement may have committed before the connection failed: a buyer who is told
        # "try again" must not be left holding tickets, nor a key that answers with this order.
        _undo_reservation(order["id"], "The order could not be saved.")
        _forget_key(claim and claim["value"], order["id"])
        raise database_unavailable(ORDER_NOT_SAVED) from None
    if created is None:
        db.session.rollback()
    return created


def _single_statement_bind():
    """Where an order's own statements run: on PostgreSQL the engine, each statement its own
    transaction on a pooled connection (rows.run_alone); on SQLite the session's connection."""
    engine = db.engine
    return engine if engine.dialect.name == "postgresql" else db.session.connection()


def _refuse_order(data, now):
    """404 for an unknown event or ticket type, 400 above its max_per_order, else 409: outside the
    sales window, or not enough tickets left."""
    try:
        refusal = events.order_refusal(data["event"], data["ticket_type"], data["quantity"], now)
    except DBAPIError:
        raise database_unavailable(ORDER_NOT_SAVED) from None  # nothing was reserved
    finally:
        db.session.rollback()
    raise refusal


ORDER_NOT_SAVED = "The database is not answering; please try again."
UNDO_RETRY_DELAYS = (0.2, 0.5)  # seconds between attempts to free the tickets of a buyer told "error"


def _undo_reservation(order_id, reason, note=None, result_code=None):
    """fail_pending_order(...), retried through a short database hiccup; None if it never got through."""
    for delay in (*UNDO_RETRY_DELAYS, None):
        try:
            return fail_pending_order(order_id, reason, note, result_code)
        except (DBAPIError, PoolTimeout) as exc:
            db.session.rollback()
            if delay is None:
                # reconcile expires it (and frees its tickets) once it is RECONCILE_EXPIRE_AFTER old.
                log.warning("Order %s may hold tickets until reconcile expires it: the database failed: %s",
                            order_id, exc.__class__.__name__)
                return None
            time.sleep(delay)


def _callback_url():
    config = current_app.config
    return f"{config['PUBLIC_BASE_URL']}/api/payhero/callback?token={config['PAYHERO_CALLBACK_TOKEN']}"


def _request_payment(order, key=None):
    """Ask PayHero for the STK push for `order` (a row); the order's body after PayHero's answer.

    `key`: the Idempotency-Key that made the order; the answer given is recorded with it."""
    try:
        answer = get_payhero().start_payment(
            amount=order["amount"],
            phone=order["phone"],
            external_reference=order["id"],
            customer_name=order["name"],
            callback_url=_callback_url(),
        )
    except PayHeroError as exc:
        if exc.unanswered:
            body = _left_pending(order, exc)
            _remember_answer(key, order["id"], 201)
            return body
        return _refused(order, exc, key)
    return _save_payhero_answer(order, answer, key)


def _left_pending(order, exc):
    """PayHero took the STK push but did not answer in time: the prompt may be on the phone and
    the customer may pay, so the order stays pending, without a PayHero reference, for its
    callback (verified with the callback's reference) or reconcile's expiry to settle."""
    log.warning("PayHero did not answer the payment request for order %s in time; left pending: %s", order["id"], exc)
    try:
        save_note(order["id"], "stk_push", {"accepted": None, "error": str(exc)[:500]})
        return order_by_id(order["id"])  # as it is now: its callback may have come already
    except (DBAPIError, PoolTimeout):
        db.session.rollback()  # only the note is lost: the order is saved, and pending as far as we know
        return order_body(order)


# M-Pesa's refusals of the prompt itself, as PayHero passes them on: the answer for each result code
# its message names.  Only these: "Insufficient float" (the merchant's) is no customer's balance.
PROMPT_REFUSALS = {
    RESULT_IN_PROGRESS: (409, "payment_in_progress"),
    **{code: (502, "payment_refused")
       for code in (RESULT_RULE_LIMITED, RESULT_PROMPT_NOT_SENT, RESULT_SYSTEM_ERROR, RESULT_NOT_PERMITTED)},
}


def _refused(order, exc, key):
    """PayHero refused the STK push: the order fails, its tickets go back, and the buyer is told why."""
    log.warning("PayHero refused the payment request for order %s: %s", order["id"], exc)
    result_code = result_code_for_message(str(exc))
    if result_code not in PROMPT_REFUSALS:
        result_code = None
    reason = PLAIN_REASONS.get(result_code) or f"The payment could not be started: {exc.public_message}"
    undone = _undo_reservation(order["id"], reason, note=("stk_push", {"accepted": False, "error": str(exc)[:500]}),
                               result_code=result_code)
    if undone is None:
        _forget_key(key, order["id"])
        raise database_unavailable(ORDER_NOT_SAVED) from None
    changed, body = undone
    if not changed:
        _remember_answer(key, order["id"], 201)
        return body  # a callback settled it while PayHero's answer was lost: that outcome stands
    if result_code is not None:  # M-Pesa's own rule: its sentence says what to do
        status, code = PROMPT_REFUSALS[result_code]
        refusal = ApiError(status, code, PLAIN_REASONS[result_code], headers={"X-Order-Id": body["id"]})
    else:
        refusal = ApiError(502, "payhero_unavailable",
                           "We could not reach M-Pesa to start the payment. Nothing was charged; please try again.",
                           headers={"X-Order-Id": body["id"]})
    _remember_answer(key, order["id"], refusal.status, {"code": refusal.code, "message": refusal.message,
                                                        "headers": refusal.headers})
    raise refusal


def _save_payhero_answer(order, answer, key):
    try:
        now = utcnow()
        row = rows.save_payhero_answer(_single_statement_bind(), order["id"], answer["reference"],
                                       answer["checkout_request_id"], now, key, _first_ask_at(now))
        if row is None:  # a callback got here first and said it already: that order stands
            db.session.commit()
            return order_by_id(order["id"])
        # A final status here means a callback came first, without naming PayHero's references.
        body = _row_body({**row, "event_slug": order["event_slug"], "ticket_type_code": order["ticket_type_code"]})
        notify_after_commit(db.session, body)
        db.session.commit()
        return body
    except (DBAPIError, PoolTimeout) as exc:
        db.session.rollback()
        # The STK push is on the customer's phone: tell them about the order they hold. Its
        # callback names it by our id, so nothing is lost without PayHero's references.
        log.warning("PayHero's answer for order %s was not saved: the database failed: %s",
                    order["id"], exc.__class__.__name__)
        return order_body(order)


def _first_ask_at(now):
    """When PayHero is to be asked about a push it took at `now`, should no callback come; None: never
    (PAYHERO_ASK_AFTER, missed_callbacks.py)."""
    schedule = current_app.config["PAYHERO_ASK_AFTER"]
    return now + timedelta(seconds=schedule[0]) if schedule else None


# -- Idempotency-Key (API.md, POST /api/orders) --
IDEMPOTENCY_KEY_TTL = timedelta(hours=24)
CLAIM_ATTEMPTS = 3
# A retry that finds its key's first request still making its answer asks again after these
# seconds (doubling), until that request has had PayHero's time (PAYHERO_*_TIMEOUT) to answer.
FIRST_ANSWER_POLL = (0.02, 0.25)


def body_hash(data):
    """What "the same body" means: the validated order (a phone in any of its forms is one phone)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _first_answer_for(claim, own_order, data):
    """The order an earlier request made with the key `claim` names: its body, or its error raised as
    first given (422 for another body).  None when no request holds the key any more.

    The key may be ours: on PostgreSQL it was claimed and no order was made (too few tickets),
    so it is let go and the buyer told why.  A first request still on its way is waited for;
    one that never finished (its worker stopped) is answered with its order as it is now.
    """
    config = current_app.config
    deadline = time.monotonic() + config["PAYHERO_CONNECT_TIMEOUT"] + config["PAYHERO_READ_TIMEOUT"] + 2
    pause, longest_pause = FIRST_ANSWER_POLL
    while True:
        row = _read_key(claim["value"])
        if row is None:
            return None
        if row["order_id"] == own_order["id"]:
            _forget_key(claim["value"], own_order["id"])
            _refuse_order(data, own_order["created_at"])
        if row["body_hash"] != claim["body_hash"]:
            raise ApiError(422, "idempotency_key_reused",
                           "This Idempotency-Key was already used for a different order; use a new key for a new order.",
                           {"Idempotency-Key": "Already used with another body."})
        if row["status_code"] is not None and row["status_code"] != 201:
            answer = row["answer"]
            raise ApiError(row["status_code"], answer["code"], answer["message"], headers=answer.get("headers"))
        order = _read_order(row["order_id"])
        if row["status_code"] == 201 and order is not None:
            return order
        if time.monotonic() > deadline:
            if order is not None:
                return order
            _forget_key(claim["value"], row["order_id"])  # a claim whose order was never made
            return None
        time.sleep(pause)
        pause = min(pause * 2, longest_pause)


def key_used(key):
    """True when the Idempotency-Key `key` already made (or is making) an order: a retry goes to that order.

    Read together with the keys of the other orders arriving meanwhile, on the waits' own connection
    (batched_reads.py): at sales open every buyer sent to the line asks this, hundreds a second, and one
    pooled connection each queued them behind the orders being made for seconds (then 503s)."""
    return bool(current_app.extensions[BATCHED_KEY_READS].read(key))


def read_keys_used(keys):
    """{key: True} for those of `keys` that made an order, in one query on the waits' own connection."""
    with database.waits_engine().connect() as connection:
        return dict.fromkeys(rows.keys_used(connection, keys), True)


def _read_key(key):
    try:
        return rows.read_key(db.session.connection(), key)
    except DBAPIError:
        raise database_unavailable(ORDER_NOT_SAVED) from None
    finally:
        db.session.remove()  # no connection held while waiting for the first request


def _remember_answer(key, order_id, status_code, answer=None):
    """Record the first answer for `key` (when there is one); a retry meanwhile waits for it."""
    if key is None:
        return
    try:
        rows.answer_key(db.session.connection(), key, order_id, status_code, answer)
        db.session.commit()
    except (DBAPIError, PoolTimeout):
        # A retry then answers with the order as it is, once the first request's time is up.
        db.session.rollback()
        log.warning("The first answer for order %s's Idempotency-Key was not saved: the database failed", order_id)


def _forget_key(key, order_id):
    """Let go of `key`'s claim for `order_id` (no order was made, or the buyer was told to try again)."""
    if key is None:
        return
    try:
        rows.release_key(db.session.connection(), key, order_id)
        db.session.commit()
    except (DBAPIError, PoolTimeout):
        db.session.rollback()  # a retry with it waits out the first request's time, then takes it over


def purge_idempotency_keys():
    """Delete Idempotency-Keys older than IDEMPOTENCY_KEY_TTL (reconcile); how many."""
    purged = rows.purge_keys(db.session.connection(), utcnow() - IDEMPOTENCY_KEY_TTL)
    db.session.commit()
    return purged


def _lock_order(order_id):
    # populate_existing: this session may still hold the order as it was before another
    # request (a callback) changed it; the locked row is the truth.
    return db.session.scalar(select(Order).where(Order.id == order_id).with_for_update(of=Order)
                             .execution_options(populate_existing=True))


def changing_order(order_id, change):
    """Lock the order, `change(order)`, commit; return what `change` returned.

    If another writer changed the order since it was read (possible only on
    SQLite, which has no row locks), start again from what it is now.
    """
    while True:
        result = change(_lock_order(order_id))
        try:
            db.session.commit()
        except StaleDataError:
            db.session.rollback()
            continue
        return result


def fail_pending_order(order_id, reason, note=None, result_code=None, unconfirmed_success=None):
    """Fail an order still pending (PayHero refused it, or it expired); return (changed, order body).

    `note`: (kind, detail) for the order's log, written in the same transaction.  `result_code`:
    M-Pesa's, when the refusal named one.  `unconfirmed_success`: a success callback for it
    (PaymentOutcome) that PayHero neither confirmed nor denied: the customer may have paid, so the
    order is also left refund_due with the receipt it claimed, for someone to check before
    refunding.  (False, None) when there is no such order.
    """
    def fail(order):
        if order is not None and note is not None:
            add_note(order_id, *note)
        if order is not None and unconfirmed_success is not None and order.status == Status.PENDING:
            order.refund_due, order.receipt = True, unconfirmed_success.receipt  # published with the failure
        return _fail_if_pending(order, reason, result_code)

    changed, body = changing_order(order_id, fail)
    if changed and unconfirmed_success is not None:
        metrics.payments_refund_due.inc()
        log.warning("Refund due: order %s expired, but a success callback claimed M-Pesa receipt %s paid KES %s "
                    "for it, which PayHero did not confirm: check before refunding (see `flask orders unsettled`)",
                    order_id, unconfirmed_success.receipt, body["amount"])
    return changed, body


def add_note(order_id, kind, detail):
    """Add to the order's log (OrderLogEntry) in the current transaction; the caller commits."""
    db.session.add(OrderLogEntry(order_id=order_id, kind=kind, detail=detail, at=utcnow()))  # now, not at the flush


def save_note(order_id, kind, detail):
    add_note(order_id, kind, detail)
    db.session.commit()


def _fail_if_pending(order, reason, result_code=None):
    if order is None:
        return False, None
    changed = order.status == Status.PENDING
    if changed:
        order.status = Status.FAILED.value
        order.result_code = result_code
        order.result_desc = reason
        rows.release_tickets(db.session.connection(), order.ticket_type_id, order.quantity)
        _touch(order)
    return changed, serialize_order(order)


def find_order_for_payment(outcome):
    """The order `outcome` is about, as {id, status, amount, payhero_reference, refund_due,
    paid_another_order}, or None.  `paid_another_order`: the outcome's receipt or reference is
    another order's (apply_payment_outcome refuses it)."""
    row = rows.find_for_payment(db.session.connection(), _payment_keys(outcome), lock=False,
                                receipt=outcome.receipt, reference=outcome.reference)
    db.session.commit()  # ends the read: no connection held by the caller's next step
    keys = ("id", "status", "amount", "payhero_reference", "refund_due", "paid_another_order")
    return {key: row[key] for key in keys} if row else None


def _payment_keys(outcome, order_id=None):
    """Where to look for the order of a payment: our id first, then PayHero's own references."""
    if order_id is not None:
        return [("id", order_id)]
    return [("id", outcome.order_id), ("checkout_request_id", outcome.checkout_request_id),
            ("payhero_reference", outcome.reference)]


def apply_payment_outcome(outcome, order_id=None, record=None, record_row=None):
    """Find the order `outcome` is about (or `order_id`), apply it under a row lock; commit.

    Returns (Transition, order body), or (None, None) when no order matches.
    The lock makes concurrent repeats of one callback queue up: the first one
    moves the order, the others find it final and change nothing.
    `record(order_id, transition)` runs in the same transaction, so a stored
    callback commits together with its effect.  `record_row(order_id, transition)`
    says the same as one row to write (a rows.RowWrite), and makes no write itself:
    it is written with the order's change, in the same statement on PostgreSQL
    (rows.change_order), or alone when nothing changes.
    """
    connection = db.session.connection()
    transition = body = None
    unwritten = record_row  # until a change writes it
    while True:
        row = rows.find_for_payment(connection, _payment_keys(outcome, order_id), lock=True,
                                    receipt=outcome.receipt, reference=outcome.reference)
        if row is None:
            break
        transition, held_again = _decide(connection, row, outcome)
        if not transition.changes:
            _log_unchanged(row, outcome, transition)
            body = _row_body(row, connection)
            break
        # With nothing left to write after it, the change goes with the COMMIT (rows._execute_then_commit).
        body = _apply(connection, row, transition, outcome, record_row and record_row(row["id"], transition),
                      commit=record is None)
        if body is not None:
            unwritten = None
            break
        # Changed since we read it (SQLite only: see rows.py): decide again on what it is now.
        if held_again:
            rows.release_tickets(connection, row["ticket_type_id"], row["quantity"])
    found_id = row["id"] if row is not None else None
    if unwritten is not None:
        rows.write_row(connection, unwritten(found_id, transition))
    if record is not None:
        record(found_id, transition)
    db.session.commit()
    if transition is not None and transition.decision is Decision.REFUND_DUE:
        metrics.payments_refund_due.inc()
    return transition, body


def _decide(connection, row, outcome):
    """decide_payment() for the order read as `row`; (Transition, whether its tickets were held again for it).

    A late success holds the order's tickets again, if they are still free, before it is applied:
    the guarded UPDATE runs under the ticket type's row lock, so the last tickets go to one order.
    """
    return decide_payment(row["status"], row["amount"], outcome, row["refund_due"], bool(row["paid_another_order"]),
                          lambda: rows.hold_tickets_again(connection, row["ticket_type_id"], row["quantity"]))


def _log_unchanged(row, outcome, transition):
    if transition.decision is Decision.IGNORED_FINAL:
        log.warning("Order %s is already %s; a later %s outcome was recorded and not applied",
                    row["id"], row["status"], outcome.status.value)
    elif transition.decision is Decision.PAYMENT_REUSED:
        log.warning("Order %s not completed: payment %s (reference %s) already paid for another order",
                    row["id"], outcome.receipt, outcome.reference)


def _apply(connection, row, transition, outcome, record=None, commit=False):
    """Make `transition` to the order read as `row`, written with `record` (a rows.RowWrite, or None); its
    new body, or None if it changed since it was read (nothing written then).  `commit`: on PostgreSQL the
    change is committed with it (the session's own commit then has nothing left to do)."""
    status = transition.status
    # A failure naming a payment another order holds (M-Pesa's failures carry no receipt; a malformed or
    # replayed one may) moves this order's status, and takes none of that payment's names: their unique
    # indexes would refuse the whole callback, and one payment never belongs to two orders.
    foreign = bool(row["paid_another_order"])
    changes = {
        "receipt": row["receipt"] if foreign else outcome.receipt or row["receipt"],
        "payhero_reference": row["payhero_reference"] or (None if foreign else outcome.reference),
        "checkout_request_id": row["checkout_request_id"] or outcome.checkout_request_id,
        # As _touch() does for ORM changes: the version moves and the change is published.
        "version": row["version"] + 1,
        "updated_at": utcnow(),
    }
    if transition.decision is Decision.REFUND_DUE:
        changes["refund_due"] = True  # the status, and why it failed, stay as they were
    else:
        changes.update(status=status.value, result_code=outcome.result_code,
                       result_desc=outcome.result_desc or PLAIN_REASONS.get(outcome.result_code),
                       receipt=None if foreign else outcome.receipt or None)
    completes = transition.decision is Decision.APPLY and status is Status.COMPLETED
    codes = [_ticket_code() for _ in range(row["quantity"])] if completes else []
    queued = messages.outbox_rows(row) if completes else []  # its SMS and email, sent after the commit
    body = order_body({**row, **changes}, codes)  # before the change: with `commit`, nothing after it may fail
    if not rows.change_order(connection, row, changes, codes, queued, transition.releases_tickets, record, commit):
        return None
    if queued:
        messages.wake_after_commit(db.session)
    if transition.decision is Decision.REFUND_DUE:
        log.warning("Refund due: order %s is %s and has no tickets left to give, but M-Pesa receipt %s paid KES %s "
                    "for it (see `flask orders unsettled`)", row["id"], row["status"], changes["receipt"], row["amount"])
    notify_after_commit(db.session, body)
    if transition.decision is Decision.APPLY:
        log.info("Order status updated: %s", status.value)
    return body


def _ticket_code():
    raw = secrets.token_hex(6).upper()
    return f"{raw[:4]}-{raw[4:8]}-{raw[8:]}"


def current_versions(order_ids):
    """{id: version} for the given orders, in one query per thousand ids; {} while the database is away."""
    return database.unless_unavailable(_versions, order_ids, default={})


def _versions(order_ids):
    versions = {}
    try:
        for start in range(0, len(order_ids), 1000):
            chunk = order_ids[start:start + 1000]
            versions.update(db.session.execute(select(Order.id, Order.version).where(Order.id.in_(chunk))).all())
    finally:
        db.session.remove()
    return versions


def _settled(order, since):
    """True when a wait should answer with `order` now rather than hold."""
    if order["status"] != Status.PENDING:
        return True
    return since is not None and order["version"] > since


BATCHED_READS = "eventi.orders.batched_reads"
BATCHED_KEY_READS = "eventi.orders.batched_key_reads"


def read_orders(order_ids):
    """{id: public body} for those of `order_ids` that exist: one query for the orders and one for
    the tickets of the completed ones, on the waits' own connection (database.waits_engine)."""
    with database.waits_engine().connect() as connection:
        found = rows.read_many(connection, order_ids)
        completed = [row["id"] for row in found if row["status"] == Status.COMPLETED]
        codes = rows.ticket_codes_of_many(connection, completed) if completed else {}
    return {row["id"]: order_body(row, codes.get(row["id"], ())) for row in found}


def _read_order_for_wait(order_id):
    """The order's public body, or None, read in one query with the orders other arriving waits need."""
    return current_app.extensions[BATCHED_READS].read(order_id)


def _read_order(order_id):
    """The order's public body, or None; the database connection is given back either way."""
    if not ORDER_ID.fullmatch(order_id):
        return None
    try:
        connection = db.session.connection()
        row = rows.read(connection, order_id)
        return _row_body(row, connection) if row is not None else None
    finally:
        # Give the connection back before holding: a held wait owns no database connection.
        db.session.remove()


# Soon enough that the page is back before the customer notices; the new worker is usually up by then.
SHUTTING_DOWN_RETRY_AFTER = "1"


def _shutting_down():
    """A stopping worker's answer to a wait it cannot hold: 503 (not 200 unchanged), so the page reconnects
    rather than counting a hold that never ran its course."""
    return ApiError(503, "shutting_down", "This server is restarting; ask again in a moment.",
                    headers={"Retry-After": SHUTTING_DOWN_RETRY_AFTER})


def wait_for_order(order_id, timeout, since, client=None):
    """The long poll: (order body, how it ended).  See GET /api/orders/<id>/wait in API.md.

    At most one database query: none when the cache answers, none when a
    published message (which carries the whole order) wakes us.  `client` is the
    request's socket when the server gives it: a client that closes it is let go
    at once (its answer goes nowhere), so it stops counting against the limits.
    """
    if not ORDER_ID.fullmatch(order_id):
        raise ApiError(404, "order_not_found", "No order with that id.")  # without subscribing to anything
    hub = get_hub()
    if hub.shutting_down:
        raise _shutting_down()
    started = time.monotonic()
    deadline = started + timeout
    result = "error"
    try:
        waiter = hub.watch(order_id, client)
    except WaitLimitReached as exc:
        if exc.scope == "order":
            raise ApiError(429, "too_many_waiters", "Too many open waits for this order.", headers={"Retry-After": "5"})
        raise ApiError(503, "server_busy", "This server is holding as many waits as it can.", headers={"Retry-After": "2"})
    try:
        # Subscribed first, then read: a change committed after this read will be delivered.
        cached = hub.latest(order_id)
        order = cached.get("order") if isinstance(cached, dict) else None
        if not isinstance(order, dict) or "version" not in order:
            order = _read_order_for_wait(order_id)
            if order is None:
                raise ApiError(404, "order_not_found", "No order with that id.")
        log.info("Long polling started for order: %s", order_id)
        result = "immediate"
        while not _settled(order, since) and not hub.shutting_down:
            result = "changed"
            waiter.seen_version = order["version"]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                result = "timeout"
                return order, result
            message, recheck = waiter.wait(remaining)
            if waiter.client_left:  # already let go by the hub; the answer goes nowhere
                result = "departed"
                return order, result
            if message is not None and message["version"] > order["version"]:
                order = message["order"]
                latency_ms = time.time() * 1000 - message["published_at_ms"]
                log.info("Order %s status changed via Redis (%dms)", order_id, latency_ms)
                metrics.delivery_latency.observe(max(latency_ms, 0) / 1000)
            elif recheck and not hub.shutting_down:
                # While the database is away the wait holds on: a callback stored after the recovery wakes it.
                fresh = database.unless_unavailable(_read_order_for_wait, order_id)
                if fresh is not None and fresh["version"] > order["version"]:
                    order = fresh
        if hub.shutting_down and not _settled(order, since):
            result = "shutdown"
            raise _shutting_down()
        return order, result
    finally:
        hub.unwatch(waiter)
        metrics.wait_duration.labels(result).observe(time.monotonic() - started)
