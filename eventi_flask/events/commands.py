"""flask --app wsgi events import FILE | events list | events show SLUG | seed-demo"""
import tomllib
from importlib import resources

import click
from flask.cli import AppGroup
from sqlalchemy.exc import SQLAlchemyError

from ..clock import east_africa_time
from ..database import cause, is_unavailable
from ..extensions import db
from ..line import service as line
from . import service

# The demo event (API.md: test-this-end-to-end) is an event file like any organizer's.
DEMO_EVENT_FILE = "demo_event.toml"

events_group = AppGroup("events", help="Put events on sale from a file, and see how they sell.")


def read_event_file(path):
    """The parsed TOML at `path`; a ClickException of one line when it cannot be read."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise click.ClickException(f"Cannot read {path}: {exc.strerror}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.ClickException(f"{path} is not valid TOML: {exc}.") from None


def import_file_data(data, label):
    """import_event(data), its refusals and a database that is away as one-line ClickExceptions."""
    try:
        return service.import_event(data)
    except service.ImportRefused as exc:
        raise click.ClickException(f"{label}: refused, nothing changed: {exc}") from None
    except SQLAlchemyError as exc:
        db.session.rollback()
        if not is_unavailable(exc):
            raise
        raise click.ClickException(f"{label}: database unavailable, nothing changed: {cause(exc)}") from None


def seed_demo():
    """Import the demo event file shipped in this package (idempotent); return the event."""
    text = resources.files(__package__).joinpath(DEMO_EVENT_FILE).read_text()
    _, _, event = import_file_data(tomllib.loads(text), DEMO_EVENT_FILE)
    return event


@click.command("seed-demo")
def seed_demo_command():
    """Create or update the demo event test-this-end-to-end from its bundled file (idempotent)."""
    event = seed_demo()
    click.echo(f"Demo event ready: /events/{event.slug}/checkout")


@events_group.command("import")
@click.argument("path", metavar="FILE")
def import_command(path):
    """Create the event FILE describes (TOML, see the README), or update it to match the file.

    Importing the same file twice changes nothing.  Refused, with nothing changed, for a missing
    or bad field, a quantity below the tickets already held, or removing a type that has orders.
    """
    outcome, changes, event = import_file_data(read_event_file(path), path)
    if outcome == "unchanged":
        click.echo(f"{event.slug}: already as {path} says; nothing changed.")
    else:
        click.echo(f"{event.slug}: {outcome} ({', '.join(changes)}). Checkout: /events/{event.slug}/checkout")


def _window(event):
    opens = east_africa_time(event["sales_start"]) if event["sales_start"] else "at once"
    closes = east_africa_time(event["sales_end"] or event["starts_at"])
    return f"sales open {opens}, close {closes}"


SALES_STATES = {"open": "on sale", "not_open": "not on sale yet", "closed": "sales closed"}


@events_group.command("list")
def list_command():
    """Every event, soonest first: when it is, its sales window, on sale or not."""
    events = service.all_events()
    if not events:
        click.echo("No events yet: put one on sale with `flask events import FILE`.")
    for event in events:
        click.echo(f"{event['slug']:<28} {SALES_STATES[event['sales_state']]:<16} "
                   f"{east_africa_time(event['starts_at'])}  {event['name']}, {event['venue']}")
        click.echo(f"{'':<28} {_window(event)}")


SALES_COLUMNS = ("price", "quantity", "sold", "pending", "available", "revenue")


@events_group.command("show")
@click.argument("slug")
def show_command(slug):
    """Per ticket type of event SLUG: price, quantity, sold, pending, available, revenue (KES)."""
    event = service.event_sales(slug)
    if event is None:
        raise click.ClickException(f"No event called {slug!r} (see `flask events list`).")
    click.echo(f"{event['name']} ({event['slug']}), {event['venue']}, {east_africa_time(event['starts_at'])}")
    click.echo(f"{SALES_STATES[event['sales_state']]}: {_window(event)}")
    click.echo(f"  {'TICKET TYPE':<20}" + "".join(f"{column.upper():>12}" for column in SALES_COLUMNS)
               + f"{'MAX/ORDER':>11}")
    for ticket_type in event["ticket_types"]:
        click.echo(f"  {ticket_type['id']:<20}" + "".join(f"{ticket_type[column]:>12,}" for column in SALES_COLUMNS)
                   + f"{ticket_type['max_per_order']:>11}")
    totals = {column: sum(tt[column] for tt in event["ticket_types"]) for column in ("sold", "pending", "revenue")}
    click.echo(f"  {'all':<20}{'':>24}" + "".join(f"{totals[column]:>12,}" for column in ("sold", "pending"))
               + f"{'':>12}{totals['revenue']:>12,}")
    click.echo(_line_text(slug, event))


def _line_text(slug, event):
    """The event's line in words: its settings, and how long it is now."""
    if not event["line"]["enabled"]:
        return "line: off (past capacity, orders are answered 503 busy)"
    cap = f", at most {event['line']['max_rate']}/s" if event["line"]["max_rate"] else ""
    settings = f"pre-queue {event['line']['pre_queue_minutes']} min before sales open{cap}"
    now = line.event_summary(slug)
    if now is None:
        return f"line: on ({settings}); its store cannot be reached"
    return (f"line: {now['length']:,} waiting, serving {now['serving_rate']:g}/s, about {now['estimated_wait_s']} s "
            f"to the last ({settings})")


def init_app(app):
    app.cli.add_command(seed_demo_command)
    app.cli.add_command(events_group)
