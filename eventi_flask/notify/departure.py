"""Noticing that a held wait's client has gone: its connection closed while we held the answer.

A held wait sleeps on its Waiter's Event.  Beside it, one libev I/O watcher on
the client's socket (no greenlet, no timer: nothing runs while nothing happens)
fires when the socket turns readable.  A client that keeps its connection open
sends nothing while it waits for our answer, so readability means one of:

* end of file or a reset: the client left (closed tab, dropped mobile data);
* bytes: the client sent more (a pipelined request) and is still there, unless
  a FIN follows them, which only the TCP state can tell (`recv` would have to
  consume the bytes first).  Either way we stop watching: the socket stays
  readable until the server reads it, so watching on would spin.

Half-closing clients (shutdown(SHUT_WR) after the request, then reading) are
treated as gone, as nginx treats them by default.  The socket is read with
MSG_PEEK only: whatever the client sent stays there for the server.
"""
import _socket
import socket

# The client's socket as each WSGI server we run under puts it in the environ:
# gunicorn's gevent worker, its gevent_pywsgi worker, and Werkzeug's dev server.
# Others (the Flask test client) give none: their waits are held to their timeout.
ENVIRON_KEYS = ("gunicorn.socket", "gunicorn.sock", "werkzeug.socket")

LEFT, STAYING, TALKING = "left", "staying", "talking"
_PEEK = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux
_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of struct tcp_info


def client_socket(environ):
    for key in ENVIRON_KEYS:
        sock = environ.get(key)
        if sock is not None:
            return sock
    return None


def client_state(fd):
    """LEFT, STAYING (nothing to read after all) or TALKING (sent more, still connected), for a readable fd.

    Called from the event loop's callback, so it never blocks: a plain, unpatched socket
    object borrows the fd for a non-blocking peek and gives it back.
    """
    try:
        probe = _socket.socket(fileno=fd)
    except OSError:
        return LEFT  # the descriptor is no longer a socket
    try:
        try:
            if not probe.recv(1, _PEEK):
                return LEFT
        except BlockingIOError:
            return STAYING
        except OSError:
            return LEFT  # reset by the peer
        if _TCP_INFO is not None and probe.family in (socket.AF_INET, socket.AF_INET6):
            try:
                if probe.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 8)[0] != _TCP_ESTABLISHED:
                    return LEFT  # CLOSE_WAIT: a FIN came after the bytes
            except OSError:
                pass
        return TALKING
    finally:
        probe.detach()
