"""flask --app wsgi messages send [--forever] | messages resend ORDER_ID"""
import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy.exc import SQLAlchemyError

from ..database import cause, is_unavailable
from ..extensions import db

messages_group = AppGroup("messages", help="The tickets' SMS and email: send what is due, send an order's again.")


def _sender():
    from .sender import Sender

    return Sender(current_app._get_current_object(), sending=True)


@messages_group.command("send")
@click.option("--forever", is_flag=True, help="Keep sending (the Procfile's worker: process, MESSAGES_SENDER=process).")
def send_command(forever):
    """Send the messages that are due."""
    sender = _sender()
    if forever:
        click.echo(f"Sending the tickets' messages; looking for due ones every {sender.interval:g}s.")
        sender.run_forever()
    try:
        count = sender.send_due()
    except SQLAlchemyError as exc:
        if not is_unavailable(exc):
            raise
        raise click.ClickException(f"database unavailable, nothing sent: {cause(exc)}") from None
    click.echo(f"{count} message(s) handled.")


@messages_group.command("resend", context_settings={"ignore_unknown_options": True})
@click.argument("order_id")
def resend_command(order_id):
    """Send ORDER_ID's SMS and email again, now, and say what became of each."""
    from .service import ResendRefused, messages_of, queue_again

    try:
        order_id, channels = queue_again(order_id)
        _sender().send_due(order_id)
        outcomes = {message["channel"]: message for message in messages_of(order_id)}
        db.session.commit()
    except ResendRefused as exc:
        raise click.ClickException(str(exc)) from None
    except SQLAlchemyError as exc:
        if not is_unavailable(exc):
            raise
        raise click.ClickException(f"database unavailable, nothing sent: {cause(exc)}") from None
    for channel in channels:
        message = outcomes[channel]
        error = f": {message['last_error']}" if message["last_error"] and message["state"] != "sent" else ""
        click.echo(f"Order {order_id}: {channel} {message['state']}{error}")
    if any(outcomes[channel]["state"] == "failed" for channel in channels):
        raise SystemExit(1)


def init_app(app):
    app.cli.add_command(messages_group)
