"""Redis over TLS, as Heroku serves it: a redis-server with only a --tls-port, its certificate
self-signed by openssl at test time.  The long poll is answered through it."""
import subprocess

import gevent
import pytest
import redis
import requests

import config
from eventi_flask import create_app
from eventi_flask.extensions import db
from tests.support import QUIET_LINE, LiveServer, callback_body, free_port, wait_until

NO_CALLBACK = "0708000004"  # the sandbox never calls back: the test sends the callback


class TlsRedis:
    def __init__(self, workdir):
        self.port = free_port()
        self.cert, self.key = workdir / "redis.crt", workdir / "redis.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(self.key), "-out", str(self.cert), "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True, capture_output=True, timeout=60,
        )
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.cert),
             "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, 10, 0.05, f"redis-server with TLS on port {self.port}")

    def url(self, query="ssl_cert_reqs=none"):
        return f"rediss://127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def client(self):
        return redis.Redis.from_url(self.url(), socket_timeout=2, socket_connect_timeout=2)

    def answers(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode} (built without TLS?)")
        try:
            with self.client() as client:
                return client.ping()
        except redis.RedisError:
            return False

    def channels(self):
        with self.client() as client:
            return {channel.decode() for channel in client.pubsub_channels()}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def tls_redis(tmp_path):
    server = TlsRedis(tmp_path)
    yield server
    server.stop()


@pytest.mark.live
def test_the_long_poll_is_answered_over_tls_redis(tls_redis, tmp_path):
    server = LiveServer({**QUIET_LINE, "WEB_CONCURRENCY": "2", "REDIS_URL": tls_redis.url(), "REDIS_PREFIX": "tls:"},
                        tmp_path / "server.log")
    try:
        server.start()
        assert requests.get(server.url + "/readyz", timeout=10).status_code == 200
        order = server.create_order(phone=NO_CALLBACK)
        waiting = gevent.spawn(requests.get, f"{server.url}/api/orders/{order['id']}/wait",
                               params={"since": order["version"], "timeout": 30}, timeout=45)
        wait_until(lambda: f"tls:order:status:{order['id']}" in tls_redis.channels(), message="the subscription over TLS")
        callback = requests.post(f"{server.url}/api/payhero/callback?token=sandbox", json=callback_body(order), timeout=10)
        assert callback.status_code == 200, callback.text
        answer = waiting.get(timeout=5)  # the database re-check is 15 s away: this is the TLS subscriber's message
        assert answer.status_code == 200 and answer.json()["status"] == "completed"
        # The message itself came over TLS (on a loaded machine the wait may have been answered
        # a moment earlier by the re-check of a subscription confirmed late; the message still arrives).
        wait_until(lambda: f"Redis message received for order: {order['id']}" in server.log(),
                   message="the published message, received by the TLS subscriber")
        log = server.log()
        assert "Redis Publisher connected" in log and "Redis subscriber connected" in log
        with tls_redis.client() as client:
            assert b'"status":"completed"' in client.get(f"tls:order:latest:{order['id']}")
    finally:
        server.stop()


@pytest.mark.parametrize("url_query, env, ready", [
    ("ssl_cert_reqs=none", {}, True),  # Heroku's self-signed certificate, said in the URL
    (None, {"REDIS_SSL_CERT_REQS": "none"}, True),  # ... or beside the add-on's URL
    ("ssl_ca_certs={cert}", {}, True),  # verified against the certificate itself
    (None, {}, False),  # verified against the system's CAs: refused, and /readyz says so
])
def test_how_a_self_signed_certificate_is_accepted(tls_redis, tmp_path, url_query, env, ready):
    url = tls_redis.url(url_query.format(cert=tls_redis.cert) if url_query else None)
    app = create_app(config.TestConfig({"DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3", "REDIS_URL": url, **env}))
    with app.app_context():
        db.create_all()
    response = app.test_client().get("/readyz")
    assert (response.status_code == 200) == ready, response.get_json()
    if not ready:
        assert "certificate verify failed" in response.get_json()["checks"]["notifications"]
