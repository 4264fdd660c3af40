"""Fixtures.  The suite runs monkey-patched, as gunicorn's gevent worker does."""
from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import re  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402
import redis  # noqa: E402
import requests_mock  # noqa: E402
from sqlalchemy import text  # noqa: E402

from config import TestConfig  # noqa: E402
from eventi_flask import create_app, database  # noqa: E402
from eventi_flask.extensions import db  # noqa: E402
from eventi_flask.notify.service import HUB, get_hub  # noqa: E402
from eventi_flask.line.service import LINE  # noqa: E402
from eventi_flask.messages import stop_sender  # noqa: E402
from eventi_flask.events.commands import seed_demo  # noqa: E402
from eventi_flask.orders import admission, missed_callbacks  # noqa: E402
from eventi_flask.payhero import sandbox, verify  # noqa: E402
from tests.support import QUIET_LINE, REDIS_URL, LiveServer, create_database, drop_database  # noqa: E402

# PayHero and our own callback URL live on this host in unit tests; requests-mock
# carries both to the app in-process (see `wire`).
PUBLIC = "http://eventi.test"
BACKENDS = ["sqlite-local", "postgres-redis"]


@pytest.fixture(scope="session")
def pg_url():
    name, url = create_database()
    yield url
    drop_database(name)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def settings(backend, tmp_path, request):
    """Environment for the app under test; a test may add to it with @pytest.mark.env(...)."""
    env = {
        "PUBLIC_BASE_URL": PUBLIC,
        "SANDBOX_CALLBACK_DELAY": "0.05",
        "ORDER_LIMIT_PER_PHONE": "off",
        "ORDER_LIMIT_PER_CLIENT": "off",
        "DATABASE_URL": f"sqlite:///{tmp_path}/test.sqlite3",
        # No shedding by the loop's lag in the test process: its loop also runs the test's own code, SMTP
        # server and threads between requests, which a worker's loop does not (a test that sheds says so).
        "ORDER_SHED_LAG": "off",
        **QUIET_LINE,
    }
    if backend == "postgres-redis":
        env["DATABASE_URL"] = request.getfixturevalue("pg_url")
        env["REDIS_URL"] = REDIS_URL
        env["REDIS_PREFIX"] = f"test:{uuid.uuid4().hex[:10]}:"
    for marker in reversed(list(request.node.iter_markers("env"))):
        env.update(marker.kwargs)
    return env


def pytest_configure(config):
    config.addinivalue_line("markers", "env(**vars): extra environment for the app under test")


@pytest.fixture
def app(settings):
    app = create_app(TestConfig({k: v for k, v in settings.items() if v is not None}))
    with app.app_context():
        db.create_all()
        if db.engine.dialect.name == "postgresql":
            tables = ", ".join(t.name for t in db.metadata.sorted_tables)
            db.session.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
            db.session.commit()
        seed_demo()
        db.session.remove()
    yield app
    shut_down(app)


def shut_down(app):
    """Stop everything an app started, as its worker's exit would: nothing of it outlives its test."""
    verify.stop(app)  # no re-verification outlives its test (and its PayHero stand-in)
    missed_callbacks.stop(app)  # nor a worker's asking about orders with no callback
    sandbox.stop(app)  # nor a sandbox callback: it would land in the next test's `wire`
    app.extensions[LINE].stop()  # no admitter ticks on into the next test
    admission.stop(app)  # nor a sampler of the loop's lag
    stop_sender(app)  # nor a sender of the tickets' messages
    with app.app_context():
        get_hub().stop()  # its Redis connections closed: a later test counts its own
        db.session.remove()
        db.engine.dispose()
        database.waits_engine().dispose()
        database.callbacks_engine().dispose()


@pytest.fixture
def hub(app):
    return app.extensions[HUB]


@pytest.fixture
def client(app):
    return app.test_client()


def forward_to(app):
    """A requests-mock callback carrying a request to `app` in-process."""
    client = app.test_client()

    def forward(request, context):
        response = client.open(request.path_url, method=request.method, data=request.body,
                               headers={k: v for k, v in request.headers.items() if k.lower() != "content-length"})
        context.status_code = response.status_code
        context.headers["Content-Type"] = response.headers.get("Content-Type", "")
        return response.get_data()

    return forward


@pytest.fixture
def wire(app):
    """Outbound HTTP to PayHero (the sandbox) and back to our callback URL, carried in-process."""
    with requests_mock.Mocker() as mocker:
        mocker.register_uri(requests_mock.ANY, re.compile("^" + re.escape(PUBLIC) + "/"), content=forward_to(app))
        yield mocker


@pytest.fixture
def log_lines(app):
    """Messages our loggers emit during the test (they do not propagate to pytest's caplog)."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("eventi_flask")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


@pytest.fixture
def redis_client():
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture(scope="module")
def live_server_factory(tmp_path_factory):
    """start(**env) -> a LiveServer running gunicorn from the Procfile; stopped at the end of the module.

    Not kept for the whole session: each server's workers keep database connections open (their pools,
    the line's admitter, the outbox's sender, the asks for missed callbacks), and PostgreSQL's 100 would
    run out."""
    servers = []

    def start(**env):
        log_path = tmp_path_factory.mktemp("gunicorn") / "server.log"
        server = LiveServer({**QUIET_LINE, **env}, log_path)  # not the benchmarks' servers: only the tests'
        servers.append(server)
        return server.start()

    yield start
    failures = []
    for server in servers:  # every one, even when stopping another failed
        try:
            server.stop()
        except Exception as exc:  # noqa: BLE001 - reported below, after the rest are stopped
            failures.append(exc)
    if failures:
        raise failures[0]
