"""flask --app wsgi reconcile | orders show | orders stuck | orders unsettled | orders settle"""
import json
import re

import click
from flask.cli import AppGroup, with_appcontext
from sqlalchemy.exc import SQLAlchemyError

from ..database import cause, is_unavailable
from ..extensions import db

@click.command("reconcile")
@with_appcontext
@click.option("--every", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
              help="Keep running, once every SECONDS (for a clock: process).")
def reconcile_command(every):
    """Settle pending orders whose PayHero callback never came."""
    import time

    from .reconcile import reconcile

    while True:
        try:
            summary = reconcile()
        except SQLAlchemyError as exc:
            if not is_unavailable(exc):
                raise
            # One line, not a traceback: a clock process goes on and tries again next round.
            db.session.remove()
            click.echo(f"Reconcile: database unavailable, nothing done: {cause(exc)}", err=True)
            if every is None:
                raise SystemExit(1)
        else:
            click.echo("Reconciled: " + ", ".join(f"{count} {what.replace('_', ' ')}" for what, count in summary.items()))
        if every is None:
            return
        time.sleep(every)


orders_group = AppGroup("orders", help="Look into orders: what happened to one, which are stuck.")

# What became of a stored callback (PayheroCallback.outcome), in words.
CALLBACK_OUTCOMES = {
    "applied": "applied",
    "repeat": "repeat, nothing changed",
    "ignored_final": "ignored: the order was already final (recorded only)",
    "refund_due": "paid, but no tickets left: refund due",
    "payment_reused": "refused: this payment already paid for another order",
    "amount_mismatch": "amount mismatch, not applied",
    "unknown_order": "no order matched",
    "invalid": "bad input, not applied",
    "unauthorized": "wrong or missing token, not applied",
    "unverified": "PayHero did not confirm it, not applied",
    "too_large": "over 64 KB, not read",
    "error": "error (database), not applied; PayHero sends it again",
    "received": "stored, being confirmed with PayHero",
}


def _outcome(callback):
    words = CALLBACK_OUTCOMES.get(callback["outcome"], callback["outcome"])
    return f"{words} ({callback['detail']})" if callback["outcome"] == "invalid" and callback["detail"] else words


def _payhero_answer(entry):
    if entry["accepted"] is None:
        return f"PayHero did not answer in time, left pending: {entry['error']}"
    if not entry["accepted"]:
        return f"PayHero refused it: {entry['error']}"
    return f"PayHero accepted it: reference {entry['reference']}, CheckoutRequestID {entry['checkout_request_id']}"


def _callback(entry):
    said = [entry["shape"]]
    if entry["result_code"] is not None:  # the flat shape has none
        said.append(f"result code {entry['result_code']!r}")
    if entry["message"] is not None:
        said.append(repr(entry["message"]))
    if entry["receipt"]:
        said.append(f"receipt {entry['receipt']}")
    return f"{', '.join(said)} -> {_outcome(entry)}"


def _reconcile_check(entry):
    if "error" in entry:  # reconcile's result is then "error"; re-verification's says what comes next
        asked = f"could not ask PayHero: {entry['error']}"
        return asked if entry["result"] == "error" else f"{asked} -> {entry['result']}"
    asked = f"transaction-status {entry['status']}" if entry.get("status") else "no PayHero reference to ask about"
    return f"{asked} -> {entry['result']}"


def _status(entry):
    if entry["status"] == "pending":
        return f"still pending (version {entry['version']})"
    if entry["status"] == "completed":
        return f"receipt {entry['receipt']}; tickets {', '.join(entry['tickets'])}"
    code = f"result code {entry['result_code']}: " if entry["result_code"] is not None else ""
    refund = f"; paid later (receipt {entry['receipt']}): refund due" if entry["refund_due"] else ""
    return f"{code}{entry['result_desc']}{refund}"


def _describe(entry):
    """(label, text) for one timeline entry."""
    kind = entry["event"]
    if kind == "created":
        return "created", f"KES {entry['amount']} for {entry['quantity']} x {entry['ticket_type']} ({entry['event_slug']})"
    if kind == "stk_push":
        return "STK push", _payhero_answer(entry)
    if kind == "callback":
        replay = f" (replay of #{entry['replay_of']})" if entry["replay_of"] else ""
        return f"callback #{entry['id']}{replay}", _callback(entry)
    if kind == "reconcile":
        return "reconcile", _reconcile_check(entry)
    if kind == "refund":
        return "refund", f"KES {entry['amount']} refunded for receipt {entry['receipt']}: reference {entry['reference']}"
    if kind == "reverify":  # the worker's own re-checks after a callback PayHero did not confirm
        return f"re-verify (+{entry['after_seconds']:g}s)", _reconcile_check(entry)
    if kind == "asked":  # a worker's ask when no callback came in time (missed_callbacks.py)
        return "asked PayHero", f"{entry['summary']}: {_reconcile_check(entry)}"
    if kind == "message":
        return f"{entry['channel']} message", _message(entry)
    return entry["status"], _status(entry)


def _message(entry):
    """A ticket message's state: sent (with the provider's id), waiting for its next attempt, or failed, and why."""
    tries = f"attempt {entry['attempts']}" if entry["attempts"] == 1 else f"{entry['attempts']} attempts"
    if entry["state"] == "sent":
        return f"sent ({tries}){': ' + entry['provider_message_id'] if entry['provider_message_id'] else ''}"
    error = f": {entry['last_error']}" if entry["last_error"] else ""
    if entry["state"] == "pending":
        return f"pending, {tries} so far, next at {entry['next_attempt_at'][:19].replace('T', ' ')}{error}"
    return f"failed after {tries}{error}"


def _print_timeline(history):
    order = history["order"]
    click.echo(f"Order {order['id']}: {order['status']}, KES {order['amount']}, {order['quantity']} x "
               f"{order['ticket_type']} for {order['event']}, phone {order['phone']} (times in UTC)")
    for entry in history["timeline"]:
        label, text = _describe(entry)
        click.echo(f"  {entry['at'][:19].replace('T', ' ')}  {label:<28} {text}")


# An order id may begin with "-": it is the argument, not an unknown option.
@orders_group.command("show", context_settings={"ignore_unknown_options": True})
@click.argument("term", metavar="ORDER_ID|RECEIPT|PHONE")
@click.option("--json", "as_json", is_flag=True, help="The same, as JSON.")
def show_command(term, as_json):
    """What happened to an order, in time order: created, PayHero's answer, each callback,
    reconcile's checks, the final status.  A phone shows its latest 10 orders."""
    from .history import find_orders, timeline

    orders = find_orders(term)
    if not orders:
        raise click.ClickException(f"No order with the id, M-Pesa receipt or phone {term!r}.")
    histories = [timeline(order) for order in orders]
    if as_json:
        click.echo(json.dumps(histories, indent=2))
        return
    for index, history in enumerate(histories):
        if index:
            click.echo()
        _print_timeline(history)


_DURATION = re.compile(r"^\s*([0-9]+)\s*([smhd]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _age(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@orders_group.command("stuck")
@click.option("--older-than", default="10m", show_default=True, metavar="AGE",
              help="How long pending: 90s, 10m, 2h, 1d (plain numbers are seconds).")
@click.option("--json", "as_json", is_flag=True, help="The same, as JSON.")
def stuck_command(older_than, as_json):
    """Orders still pending past an age: the first thing to run when PayHero has an incident."""
    from .history import stuck_orders

    match = _DURATION.match(older_than)
    if match is None:
        raise click.ClickException(f"--older-than must look like 90s, 10m, 2h or 1d, got {older_than!r}.")
    stuck = stuck_orders(int(match.group(1)) * _SECONDS[match.group(2)])
    if as_json:
        click.echo(json.dumps(stuck, indent=2))
        return
    if not stuck:
        click.echo(f"No order has been pending for more than {older_than.strip()}.")
        return
    click.echo(f"{len(stuck)} order(s) pending for more than {older_than.strip()}, oldest first:")
    click.echo(f"  {'ID':<24} {'AGE':>5} {'AMOUNT':>9}  {'PHONE':<13} {'PAYHERO REFERENCE':<34} CALLBACKS STORED")
    for order in stuck:
        callbacks = f"{len(order['callbacks'])}: {', '.join(order['callbacks'])}" if order["callbacks"] else "none"
        click.echo(f"  {order['id']:<24} {_age(order['age_seconds']):>5} {'KES ' + str(order['amount']):>9}  "
                   f"{order['phone']:<13} {order['reference'] or '-':<34} {callbacks}")


@orders_group.command("unsettled")
@click.option("--json", "as_json", is_flag=True, help="The same, as JSON.")
def unsettled_command(as_json):
    """Orders owed a refund: paid after they failed or were cancelled, with no tickets left to give."""
    from .refunds import unsettled_orders

    unsettled = unsettled_orders()
    if as_json:
        click.echo(json.dumps(unsettled, indent=2))
        return
    if not unsettled:
        click.echo("No order is owed a refund.")
        return
    click.echo(f"{len(unsettled)} order(s) owed a refund, oldest first (refund each, then `orders settle`):")
    click.echo(f"  {'ID':<24} {'AMOUNT':>10}  {'RECEIPT':<12} {'PHONE':<13} {'STATUS':<10} PAID AT (UTC)")
    for order in unsettled:
        click.echo(f"  {order['id']:<24} {'KES ' + str(order['amount']):>10}  {order['receipt'] or '-':<12} "
                   f"{order['phone']:<13} {order['status']:<10} {order['paid_at'][:19].replace('T', ' ')}")


@orders_group.command("settle", context_settings={"ignore_unknown_options": True})
@click.argument("order_id")
@click.option("--refund-reference", required=True, metavar="REF",
              help="The refund's own reference (the M-Pesa reversal's receipt, or PayHero's).")
def settle_command(order_id, refund_reference):
    """Record that ORDER_ID's payment was refunded: kept in its timeline, and off the unsettled list."""
    from .refunds import RefundRefused, settle

    try:
        order = settle(order_id, refund_reference)
    except RefundRefused as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Order {order['id']}: refund of KES {order['amount']} for receipt {order['receipt']} recorded "
               f"as {refund_reference.strip()}.")


def init_app(app):
    app.cli.add_command(reconcile_command)
    app.cli.add_command(orders_group)
