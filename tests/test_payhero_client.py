"""The PayHero client against a stand-in server that closes kept-alive connections as real servers do."""
import json
import time

import gevent
import gevent.server
import pytest

from eventi_flask.payhero import client as payhero_client
from eventi_flask.payhero.client import PayHeroClient, PayHeroError

KEEPALIVE = 1.0  # the stand-in's keep-alive: a connection idle this long is being closed by the server


class ClosingPayHero:
    """PayHero's payment endpoint, HTTP/1.1 with keep-alive.  A request arriving on a connection idle past
    KEEPALIVE meets the server closing it: the connection closes with no answer, as when a request crosses
    the server's close on the wire ("Remote end closed connection without response")."""

    def __init__(self):
        self.connections = 0
        self.answered = 0
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self.handle)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def handle(self, sock, _address):
        self.connections += 1
        reader, idle_since = sock.makefile("rb"), time.monotonic()
        while True:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = reader.readline()
                if not line:
                    return
                head += line
            if time.monotonic() - idle_since > KEEPALIVE:
                sock.close()
                return
            length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0)
            reader.read(length)
            body = json.dumps({"success": True, "status": "QUEUED", "reference": f"R{self.answered}",
                               "CheckoutRequestID": f"ws_{self.answered}"}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            self.answered += 1
            idle_since = time.monotonic()


@pytest.fixture
def payhero():
    server = ClosingPayHero()
    yield server
    server.server.stop()


def pay(client):
    return client.start_payment(100, "254712345678", "order-1", "Wanjiru", "https://example.test/callback")


def test_a_connection_idle_as_long_as_the_servers_keepalive_is_not_reused(payhero, monkeypatch):
    monkeypatch.setattr(payhero_client, "IDLE_REUSE_MOST", KEEPALIVE / 2)
    client = PayHeroClient(payhero.url, "user", "secret", 123)

    assert pay(client)["reference"] == "R0"
    assert pay(client)["reference"] == "R1"  # at once: the same connection, kept alive
    assert payhero.connections == 1
    time.sleep(KEEPALIVE * 1.2)  # idle as long as the server keeps it: the server is closing it
    # Not sent on that connection (it would meet the close, and the buyer be refused): on a new one.
    assert pay(client)["reference"] == "R2"
    assert payhero.connections == 2


def test_without_that_rule_the_same_payment_is_refused(payhero, monkeypatch):
    # What the rule prevents, shown on the same stand-in: the payment meets the server's close.
    monkeypatch.setattr(payhero_client, "IDLE_REUSE_MOST", float("inf"))
    client = PayHeroClient(payhero.url, "user", "secret", 123)
    pay(client)
    time.sleep(KEEPALIVE * 1.2)
    with pytest.raises(PayHeroError, match="could not be reached"):
        pay(client)
