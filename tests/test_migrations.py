"""The release step: migrations build the schema the models describe, on PostgreSQL and SQLite."""
import json
import logging
import os
import subprocess
import sys

import pytest

from eventi_flask.logs import JsonFormatter
from tests.support import ROOT, create_database, drop_database


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/release.sqlite3"
        return
    name, url = create_database()
    yield url.replace("postgresql://", "postgres://")  # Heroku's spelling must work too
    drop_database(name)


def flask(*args, url):
    env = {**os.environ, "DATABASE_URL": url}
    env.pop("REDIS_URL", None)
    return subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def test_upgrade_then_models_and_migrations_agree(database_url):
    upgrade = flask("db", "upgrade", url=database_url)
    assert upgrade.returncode == 0, upgrade.stderr
    check = flask("db", "check", url=database_url)
    assert check.returncode == 0, check.stdout + check.stderr  # "No new upgrade operations detected."
    for _ in range(2):  # seed-demo is idempotent
        seeded = flask("seed-demo", url=database_url)
        assert seeded.returncode == 0 and "test-this-end-to-end" in seeded.stdout, seeded.stderr


def test_json_logs_are_one_object_a_line():
    record = logging.LogRecord("eventi_flask.orders", logging.INFO, __file__, 1, "Order status updated: %s",
                               ("completed",), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "Order status updated: completed" and entry["level"] == "INFO"


def test_json_log_tracebacks_are_redacted_too():
    from eventi_flask.security import RedactingFilter

    try:
        raise ValueError("bad phone 0712345678 for a@b.co with token=s3cret")
    except ValueError:
        import sys

        record = logging.LogRecord("eventi_flask", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    RedactingFilter().filter(record)
    line = JsonFormatter().format(record)
    assert "0712345678" not in line and "a@b.co" not in line and "s3cret" not in line
