"""Publishing order changes after the commit, never before.

The service layer stages a message on the session; the after_commit hook
hands it to the hub once the connection is released.  A rollback drops it.  A publish failure is logged by
the hub and never reaches the caller: the database already has the truth.
"""
import time

from flask import current_app
from sqlalchemy import event
from sqlalchemy.orm import Session

OUTBOX = "eventi.outbox"
COMMITTED = "eventi.committed"
HUB = "eventi.hub"


def get_hub():
    return current_app.extensions[HUB]


def order_message(order_body):
    """The pub/sub message of API.md, carrying the whole order so a woken wait needs no query."""
    return {
        "id": order_body["id"],
        "status": order_body["status"],
        "version": order_body["version"],
        "updated_at": order_body["updated_at"],
        "published_at_ms": None,  # stamped by publish_staged()
        "order": order_body,
    }


def notify_after_commit(session, order_body):
    session.info.setdefault(OUTBOX, []).append((get_hub(), order_message(order_body)))


@event.listens_for(Session, "after_commit")
def mark_committed(session):
    session.info[COMMITTED] = session.info.pop(OUTBOX, [])


@event.listens_for(Session, "after_transaction_end")
def publish_staged(session, transaction):
    # after_commit still holds the database connection; by transaction end it is
    # back in the pool, so a slow Redis never keeps a connection from others.
    if transaction.parent is not None:
        return
    for hub, message in session.info.pop(COMMITTED, ()):
        message["published_at_ms"] = int(time.time() * 1000)
        hub.publish(message)


@event.listens_for(Session, "after_rollback")
def drop_staged(session):
    session.info.pop(OUTBOX, None)
