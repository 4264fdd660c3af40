"""Deploying on Heroku: app.json (the Heroku Button), .python-version, and the hold on a dyno."""
import json
import re
import runpy
import sys
import types

import pytest

from config import Config, ConfigError
from tests.support import DEMO, ROOT, procfile_command

APP_JSON = json.loads((ROOT / "app.json").read_text())
ROUTER_CUT = 30  # seconds: Heroku's router drops an unanswered request, and SIGKILL follows SIGTERM, after this
# What Heroku and the add-ons set beside app.json's env.
HEROKU = {"DYNO": "web.1", "PORT": "5000", "DATABASE_URL": "postgres://u:p@db.example.com:5432/d",
          "REDIS_URL": "rediss://:pw@redis.example.com:6380"}


def app_json_env(generated="a-generated-secret"):
    """The environment the button gives the app: each variable's value, a secret where it generates one."""
    env = {}
    for name, spec in APP_JSON["env"].items():
        if "value" in spec:
            env[name] = spec["value"]
        elif spec.get("generator") == "secret":
            env[name] = generated
    return env


def test_app_json_is_a_button_manifest_naming_the_procfile_processes_and_the_add_ons():
    assert 3 <= len(APP_JSON["name"]) <= 30 and len(APP_JSON["description"]) <= 140
    assert set(APP_JSON["formation"]) == {"web", "clock"}
    for process in APP_JSON["formation"]:
        assert procfile_command(process)  # each process of the formation is a Procfile line
    assert procfile_command("release")[-2:] == ["db", "upgrade"]  # the release phase migrates, before postdeploy
    assert APP_JSON["scripts"]["postdeploy"] == "flask --app wsgi seed-demo"
    assert {addon["plan"].split(":")[0] for addon in APP_JSON["addons"]} == {"heroku-postgresql", "heroku-redis"}


def test_the_buttons_environment_starts_the_app_as_the_contract_says():
    config = Config({**HEROKU, **app_json_env()})
    assert APP_JSON["env"]["PAYHERO_CALLBACK_TOKEN"]["generator"] == "secret"
    assert config.PAYHERO_CALLBACK_TOKEN == "a-generated-secret" and config.PAYHERO_MODE == "sandbox"
    assert config.PROXY_HOPS == 1
    assert config.REDIS_URL.endswith("?ssl_cert_reqs=none")  # Heroku Redis's self-signed certificate
    assert config.SQLALCHEMY_DATABASE_URI.startswith("postgresql+psycopg://")
    assert (config.WAIT_TIMEOUT_DEFAULT, config.WAIT_TIMEOUT_MAX) == (25, 28)


def test_app_json_offers_every_variable_live_mode_requires():
    live = {**HEROKU, **app_json_env(), "PAYHERO_MODE": "live", "PAYHERO_API_USERNAME": "u",
            "PAYHERO_API_PASSWORD": "p", "PAYHERO_CHANNEL_ID": "1"}
    Config(live)
    for name in ("PAYHERO_API_USERNAME", "PAYHERO_API_PASSWORD", "PAYHERO_CHANNEL_ID", "PAYHERO_CALLBACK_TOKEN"):
        with pytest.raises(ConfigError, match=name):
            Config({k: v for k, v in live.items() if k != name})
        assert name in APP_JSON["env"]
    assert "PAYHERO_MODE" in APP_JSON["env"] and "PUBLIC_BASE_URL" in APP_JSON["env"]


def test_python_version_names_the_python_the_tests_run_on():
    version = (ROOT / ".python-version").read_text().strip()
    assert re.fullmatch(r"\d+\.\d+", version) and version == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_on_a_dyno_the_hold_fits_under_the_routers_cut_unless_told_otherwise():
    assert (Config({"DYNO": "web.1"}).WAIT_TIMEOUT_DEFAULT, Config({"DYNO": "web.1"}).WAIT_TIMEOUT_MAX) == (25, 28)
    assert Config({"DYNO": "web.1"}).WAIT_TIMEOUT_MAX < ROUTER_CUT
    assert (Config({}).WAIT_TIMEOUT_DEFAULT, Config({}).WAIT_TIMEOUT_MAX) == (55, 60)
    told = Config({"DYNO": "web.1", "WAIT_TIMEOUT_DEFAULT": "10", "WAIT_TIMEOUT_MAX": "12"})
    assert (told.WAIT_TIMEOUT_DEFAULT, told.WAIT_TIMEOUT_MAX) == (10, 12)
    assert Config({"DYNO": "web.1", "WAIT_TIMEOUT_MAX": "20"}).WAIT_TIMEOUT_DEFAULT == 20


@pytest.mark.env(DYNO="web.1")
def test_on_a_dyno_a_wait_longer_than_28_s_is_refused_and_the_page_holds_25_s(client, wire):
    order = client.post("/api/orders", json={**DEMO, "phone": "0708000004"}).get_json()
    response = client.get(f"/api/orders/{order['id']}/wait", query_string={"timeout": 29, "since": 1})
    assert response.status_code == 400 and "timeout" in response.get_json()["error"]["fields"]
    page = client.get(f"/orders/{order['id']}").get_data(as_text=True)
    assert 'data-hold-seconds="25"' in page


def test_gunicorn_lets_go_of_its_workers_before_herokus_sigkill():
    settings = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert settings["graceful_timeout"] <= ROUTER_CUT - 5  # the master's own exit fits in what is left


def test_gunicorn_sends_an_answers_head_and_body_in_one_write(monkeypatch):
    # Two sends per answer, where one does, were the largest single cost in a worker's profile at sales open.
    from gunicorn.config import Config as GunicornConfig
    from gunicorn.http.wsgi import Response

    monkeypatch.setattr(Response, "write", Response.write)  # put back after the test
    runpy.run_path(str(ROOT / "gunicorn.conf.py"))["send_head_with_body"]()

    class Socket:
        def __init__(self):
            self.writes = []

        def sendall(self, data):
            self.writes.append(data)

    def answer(method, status, body, headers=()):
        request = types.SimpleNamespace(version=(1, 1), method=method, should_close=lambda: False)
        sock = Socket()
        response = Response(request, sock, GunicornConfig())
        response.start_response(status, [("Content-Type", "application/json"), *headers])
        for part in body:
            response.write(part)
        response.close()
        return sock.writes

    writes = answer("GET", "200 OK", [b'{"ok": true}'], [("Content-Length", "12")])
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b'\r\n\r\n{"ok": true}')
    writes = answer("GET", "200 OK", [b"first ", b"then"], [("Content-Length", "10")])  # a second part: its own write
    assert [w[-6:] for w in writes] == [b"first ", b"then"]
    writes = answer("HEAD", "200 OK", [b'{"ok": true}'], [("Content-Length", "12")])  # the head alone, as gunicorn does
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\n")
    chunked = answer("GET", "200 OK", [b"streamed"])  # no length: chunked, written as gunicorn writes it
    assert b"".join(chunked).endswith(b"8\r\nstreamed\r\n0\r\n\r\n")
    # An app's mistake (a str for bytes): nothing was sent, so gunicorn can still answer 500.
    response = Response(types.SimpleNamespace(version=(1, 1), method="GET", should_close=lambda: False), Socket(),
                        GunicornConfig())
    response.start_response("200 OK", [("Content-Length", "9")])
    with pytest.raises(TypeError):
        response.write("not bytes")
    assert not response.headers_sent and response.sock.writes == []
