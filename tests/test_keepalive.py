"""A kept-alive connection whose next request arrives as gunicorn's keepalive runs out is served, not reset.

A PayHero-like sender keeps its connections alive and sends each callback once.  gunicorn waits
`keepalive` seconds for the next request on an idle connection, then closes it; when the worker's
event loop runs late (under load), the timer and a request that has just arrived are seen in the
same turn, and the timer runs first: the connection was closed with the request unread, which is a
TCP reset for the sender, and a callback lost.  Here the worker is frozen across the deadline, so
that both arrive in one turn every time.
"""
import os
import signal
import socket
import time

import pytest

from tests.support import wait_until
from tests.test_scale import worker_pid

KEEPALIVE = 5  # gunicorn.conf.py


def exchange(sock, path="/healthz"):
    """One GET on a kept-alive connection: the status line."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return read_answer(sock)


def read_answer(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n")[0].decode()


@pytest.mark.live
def test_a_request_arriving_as_the_keepalive_runs_out_is_answered(live_server_factory):
    server = live_server_factory(WEB_CONCURRENCY="1", LOG_LEVEL="warning")
    pid = worker_pid(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert exchange(sock).endswith("200 OK")
        os.kill(pid, signal.SIGSTOP)  # a worker whose loop runs late, at its worst
        try:
            time.sleep(KEEPALIVE + 0.5)  # past the keepalive deadline, on the frozen worker's clock
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert read_answer(sock).endswith("200 OK")
        # Idle again, it is still closed once the keepalive runs out: with a FIN, not a reset.
        sock.settimeout(KEEPALIVE + 5)
        assert sock.recv(1) == b""
    wait_until(lambda: server.proc.poll() is None, message="gunicorn still running")
