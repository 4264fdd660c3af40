"""Configuration: read from the environment, one clear line for a mistake."""
import subprocess
import sys

import pytest

from config import Config, ConfigError, database_url
from tests.support import ROOT


def test_heroku_postgres_urls_use_psycopg_3():
    assert database_url("postgres://u:p@h:5432/d") == "postgresql+psycopg://u:p@h:5432/d"
    assert database_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert database_url("sqlite:///x.db") == "sqlite:///x.db"


def test_defaults_are_the_embedded_ones():
    config = Config({})
    assert config.SQLALCHEMY_DATABASE_URI.startswith("sqlite:///") and config.REDIS_URL is None
    assert config.PAYHERO_MODE == "sandbox" and config.PAYHERO_CALLBACK_TOKEN == "sandbox"
    assert config.PAYHERO_BASE_URL == "http://127.0.0.1:8000/sandbox/payhero"
    assert (config.WAIT_TIMEOUT_DEFAULT, config.WAIT_TIMEOUT_MAX) == (55, 60)
    assert config.ORDER_LIMIT_PER_PHONE == "3 per 5 minutes" and config.ORDER_LIMIT_PER_CLIENT == "30 per minute"


def test_postgresql_prepares_no_statement_on_the_server_unless_asked():
    """A transaction-mode pooler would run a prepared statement on a server connection that never saw it."""
    def connect_args(**env):
        return Config({"DATABASE_URL": "postgres://u@h/d", **env}).SQLALCHEMY_ENGINE_OPTIONS["connect_args"]

    assert connect_args() == {"prepare_threshold": None, "connect_timeout": 5}
    assert connect_args(DB_PREPARED_STATEMENTS="1")["prepare_threshold"] == 5


def test_postgresql_keeps_connections_for_callbacks_that_orders_cannot_take():
    assert Config({"DATABASE_URL": "postgres://u@h/d"}).DB_CALLBACK_POOL_SIZE == 16
    assert Config({"DATABASE_URL": "postgres://u@h/d", "DB_CALLBACK_POOL_SIZE": "8"}).DB_CALLBACK_POOL_SIZE == 8
    assert Config({}).DB_CALLBACK_POOL_SIZE is None  # SQLite: callbacks use the app's engine


@pytest.mark.parametrize("backend", ["postgres-redis"])
def test_postgresql_keeps_the_connections_a_burst_opened_for_the_next(app):
    """A line admits a batch of orders every second.  An overflow connection is closed as it comes back, so
    each batch opened its PostgreSQL backends again (760-860 sessions per 6,000 buyers, each a process
    forked and set up); the pool keeps what it opened, up to the same ceiling."""
    from sqlalchemy import event

    from eventi_flask.extensions import db

    with app.app_context():
        opened = []
        event.listen(db.engine, "connect", lambda *_: opened.append(1))

        def burst(size):
            connections = [db.engine.connect() for _ in range(size)]
            for connection in connections:
                connection.close()

        burst(20)
        first = len(opened)
        assert first > 0
        burst(20)
        burst(20)
        assert len(opened) == first  # the next bursts took the same connections


def test_a_certificate_requirement_is_added_to_a_tls_redis_url_that_does_not_say_one():
    def url(raw, **env):
        return Config({"REDIS_URL": raw, **env}).REDIS_URL

    assert url("rediss://:pw@h:6380/0", REDIS_SSL_CERT_REQS="none") == "rediss://:pw@h:6380/0?ssl_cert_reqs=none"
    assert url("rediss://h/0?ssl_cert_reqs=required", REDIS_SSL_CERT_REQS="none") == "rediss://h/0?ssl_cert_reqs=required"
    assert url("redis://h/0", REDIS_SSL_CERT_REQS="none") == "redis://h/0"  # no TLS, nothing to verify
    assert url("rediss://h/0") == "rediss://h/0"


LIVE = {"PAYHERO_MODE": "live", "PAYHERO_API_USERNAME": "u", "PAYHERO_API_PASSWORD": "p", "PAYHERO_CHANNEL_ID": "1",
        "PAYHERO_CALLBACK_TOKEN": "t", "SECRET_KEY": "s"}


def test_callbacks_are_verified_by_default_in_live_mode_only():
    assert Config(LIVE).PAYHERO_VERIFY_CALLBACKS is True
    assert Config({**LIVE, "PAYHERO_VERIFY_CALLBACKS": "0"}).PAYHERO_VERIFY_CALLBACKS is False
    assert Config({}).PAYHERO_VERIFY_CALLBACKS is False
    assert Config({}).PAYHERO_CALLBACK_TOKEN_PREVIOUS is None
    assert Config({**LIVE, "PAYHERO_CALLBACK_TOKEN_PREVIOUS": "old"}).PAYHERO_CALLBACK_TOKEN_PREVIOUS == "old"


def test_an_unconfirmed_success_is_asked_about_again_within_a_minute_with_a_short_timeout():
    config = Config(LIVE)
    assert config.PAYHERO_REVERIFY_AFTER == (2, 5, 10, 20, 40)
    assert config.PAYHERO_REVERIFY_AFTER[-1] < config.RECONCILE_AFTER  # settled by then, not by reconcile
    assert config.PAYHERO_VERIFY_TIMEOUT == 5 < config.PAYHERO_READ_TIMEOUT
    assert Config({**LIVE, "PAYHERO_REVERIFY_AFTER": "off"}).PAYHERO_REVERIFY_AFTER == ()
    assert Config({**LIVE, "PAYHERO_READ_TIMEOUT": "3"}).PAYHERO_VERIFY_TIMEOUT == 3


def test_an_order_with_no_callback_is_asked_about_after_the_prompt_had_its_time_and_before_reconcile():
    config = Config({})
    assert config.PAYHERO_ASK_AFTER == (75, 105, 165, 285, 525)
    assert config.PAYHERO_ASK_AFTER[0] < config.RECONCILE_AFTER < config.RECONCILE_EXPIRE_AFTER
    assert Config({"PAYHERO_ASK_AFTER": "off"}).PAYHERO_ASK_AFTER == ()


@pytest.mark.parametrize("env, variable", [
    ({"PORT": "eighty"}, "PORT"),
    ({"PAYHERO_MODE": "test"}, "PAYHERO_MODE"),
    ({"WAIT_TIMEOUT_DEFAULT": "90"}, "WAIT_TIMEOUT_DEFAULT"),
    ({"PAYHERO_VERIFY_CALLBACKS": "maybe"}, "PAYHERO_VERIFY_CALLBACKS"),
    ({"ORDER_LIMIT_PER_PHONE": "lots"}, "ORDER_LIMIT_PER_PHONE"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"SANDBOX_CALLBACK_SHAPE": "round"}, "SANDBOX_CALLBACK_SHAPE"),
    ({"SANDBOX_CALLBACK_RETRY_FOR": "-1"}, "SANDBOX_CALLBACK_RETRY_FOR"),
    ({"PAYHERO_VERIFY_TIMEOUT": "30"}, "PAYHERO_VERIFY_TIMEOUT"),  # longer than the STK push's own
    ({"PAYHERO_REVERIFY_AFTER": "10,5"}, "PAYHERO_REVERIFY_AFTER"),
    ({"PAYHERO_REVERIFY_AFTER": "soon"}, "PAYHERO_REVERIFY_AFTER"),
    ({"PAYHERO_ASK_AFTER": "75,30"}, "PAYHERO_ASK_AFTER"),
    ({"PAYHERO_MODE": "live", "PAYHERO_API_USERNAME": "u", "PAYHERO_API_PASSWORD": "p", "PAYHERO_CHANNEL_ID": "1"},
     "PAYHERO_CALLBACK_TOKEN"),
    ({"PAYHERO_MODE": "live", "PAYHERO_CALLBACK_TOKEN": "t"}, "PAYHERO_API_USERNAME"),
    ({k: v for k, v in LIVE.items() if k != "SECRET_KEY"}, "SECRET_KEY"),  # it signs the ticket links
    ({"DATABASE_URL": "postgres://u@h/d", "DB_PREPARED_STATEMENTS": "perhaps"}, "DB_PREPARED_STATEMENTS"),
    ({"DATABASE_URL": "postgres://u@h/d", "DB_CONNECT_TIMEOUT": "0"}, "DB_CONNECT_TIMEOUT"),
    ({"DATABASE_URL": "postgres://u@h/d", "DB_CALLBACK_POOL_SIZE": "0"}, "DB_CALLBACK_POOL_SIZE"),  # none left for callbacks
    ({"REDIS_SSL_CERT_REQS": "off"}, "REDIS_SSL_CERT_REQS"),
    ({"ORDER_SHED_LAG": "0.1"}, "ORDER_SHED_LAG"),  # two figures: where shedding starts, where it is total
    ({"ORDER_SHED_LAG": "0.3,0.1"}, "ORDER_SHED_LAG"),
])
def test_a_mistake_names_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        Config(env)


def test_the_cli_refuses_to_start_with_one_line_and_no_traceback():
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "seed-demo"], cwd=ROOT,
                            env={"PATH": "/usr/bin:/bin", "PAYHERO_MODE": "live"}, capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["Configuration error: PAYHERO_API_USERNAME is required but not set"]
