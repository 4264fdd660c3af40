"""The tickets, sent to the buyer by SMS and email through a transactional outbox."""
from . import commands, models  # noqa: F401 (the outbox table is part of the schema)
from .service import SENDER


def init_app(app):
    from .sender import Sender

    # Started in each web worker by gunicorn.conf.py (post_worker_init), never in a CLI process.
    app.extensions[SENDER] = Sender(app, sending=app.config["MESSAGES_SENDER"] == "web", in_web_worker=True)
    commands.init_app(app)


def start_sender(app):
    """Run this process's sender in its own greenlet: in web mode it sends; in process mode it keeps the gauges."""
    return app.extensions[SENDER].start()


def stop_sender(app):
    app.extensions[SENDER].stop()
