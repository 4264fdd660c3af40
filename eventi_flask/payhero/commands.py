"""flask --app wsgi callbacks replay <callback id>"""
import re

import click
from flask.cli import AppGroup

callbacks_group = AppGroup("callbacks", help="Stored PayHero callbacks.")
CALLBACK_ID = re.compile(r"^[0-9]{1,9}$")


@callbacks_group.command("replay")
@click.argument("callback_id")
def replay_command(callback_id):
    """Send stored callback CALLBACK_ID through the live callback path again.

    Stored again as a new callback, applied at most once, waiters notified:
    safe to run twice.  Exits 1 unless the replay was answered 200.
    """
    from .replay import replay_callback

    if not CALLBACK_ID.match(callback_id):
        raise click.ClickException(f"A callback id is a number (see `orders show`), got {callback_id!r}.")
    try:
        replay, status, answer = replay_callback(int(callback_id))
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    stored = f"replayed as #{replay.id} ({replay.outcome})" if replay is not None else "could not be stored"
    if status != 200:
        raise click.ClickException(f"Callback #{callback_id} {stored}: {status} {answer['error']['message']}")
    click.echo(f"Callback #{callback_id} {stored}: order {answer['order']} is {answer['status']}.")


def init_app(app):
    app.cli.add_command(callbacks_group)
