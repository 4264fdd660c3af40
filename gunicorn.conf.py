"""gunicorn settings: gevent workers, each holding thousands of long polls."""
import os
import sys

# Greenlets need not remember who spawned them: gevent otherwise keeps the spawning
# stack (4 frame records) and tree per greenlet, objects every full garbage
# collection walks for each held wait.  Read by gevent when the worker starts it.
os.environ.setdefault("GEVENT_TRACK_GREENLET_TREE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from config import Config, ConfigError, read_number  # noqa: E402

try:
    port = read_number(os.environ, "PORT", 8000, minimum=1, maximum=65535)
    workers = read_number(os.environ, "WEB_CONCURRENCY", 1, minimum=1, maximum=64)
    # 10,000 held waits plus room for callbacks, page loads and health checks.
    worker_connections = read_number(os.environ, "GUNICORN_WORKER_CONNECTIONS", 12000, minimum=1)
except ConfigError as exc:
    print(f"Configuration error: {exc}", file=sys.stderr)
    sys.exit(1)
bind = f"0.0.0.0:{port}"
worker_class = "gevent"
backlog = 4096
# A held wait lasts up to WAIT_TIMEOUT_MAX (60 s); on SIGTERM they are answered
# at once (503 shutting_down), so the graceful window only drains stragglers.
# Heroku sends SIGKILL 30 s after SIGTERM: the workers are stopped well before that.
graceful_timeout = 25
timeout = 30
# Idle keep-alive connections hold up a graceful stop, so keep them short.  A request that arrives
# just as this runs out is still served (serve_requests_already_sent below).
keepalive = 5
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
# The path without its query string: the callback URL carries the PayHero token there.
access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(f)s" "%(a)s" %(M)sms'
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()


def on_starting(server):
    """Refuse to start on a configuration mistake, with one line and no traceback."""
    try:
        Config()
    except ConfigError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        sys.exit(1)


def post_fork(server, worker):
    """A full garbage collection stops every held wait at once: make them rare.

    At 10,000 held waits the collector walks ~900,000 objects: 0.15 s per full
    pass on a quiet machine, 1.1 s on a busy one (measured with a gc probe, since removed). With
    CPython's default (700, 10, 10), opening 10,000 waits made 7-8 full passes;
    with (700, 10, 100), one; with (7000, 10, 100), none (the young generation
    collected 164 times, the middle one 14): a full pass now comes after ~7
    million net allocations, about 70,000 waits opened.  The price: cyclic
    garbage that reaches the old generation waits that long to be freed, and a
    young pass scans up to 7,000 objects (about a millisecond) instead of 700.
    """
    import gc

    gc.set_threshold(7000, 10, 100)
    accept_more_per_loop_turn()


# With more than one worker, gunicorn's gevent worker accepts one connection per turn of its
# event loop (max_accept = 1, so that workers share the connections).  A busy turn takes tens of
# milliseconds: each worker then took 30-50 new connections a second, and at 100 buyers/s (an
# order, its sandbox callback, each a connection) they queued in the listen backlog for seconds,
# out of this worker's sight: orders answered in 0.3 s inside the worker took 5 s for the buyer.
# Accepted, a buyer is the worker's to answer: at once, or 503 busy (orders/admission.py).
ACCEPTS_PER_LOOP_TURN = 16


def accept_more_per_loop_turn():
    from gevent.server import StreamServer

    start = StreamServer.start

    def start_accepting_more(server):
        server.max_accept = max(server.max_accept, ACCEPTS_PER_LOOP_TURN)
        start(server)

    StreamServer.start = start_accepting_more


# gunicorn waits `keepalive` seconds for the next request on a kept-alive connection (a gevent
# Timeout around the parser), then closes it.  When the event loop runs late, the timer and a
# request that has just arrived come due in one turn; the timer runs first (libev runs the
# timers it queued last first), and the connection was closed with the request unread: a TCP
# reset for the sender, who cannot know whether it landed.  A PayHero callback sent once is then
# lost (issue 24).  Instead: at the deadline, a connection with bytes waiting gets GRACE seconds
# for its request; one with none closes as before (a FIN: nothing was sent on it).
KEEPALIVE_GRACE = 5.0


def serve_requests_already_sent():
    import gevent
    from gunicorn.workers.ggevent import GeventWorker

    from eventi_flask.notify.departure import TALKING, client_state

    clients = {}  # the greenlet serving a connection -> its socket

    class KeepAliveTimeout(gevent.Timeout):
        def __init__(self, seconds, client):
            super().__init__(seconds, False)
            self.client, self.graced = client, False

        def _on_expiration(self, prev_greenlet, ex):
            # Run by the event loop: client_state peeks without blocking.
            if not self.graced and self.client is not None and client_state(self.client.fileno()) == TALKING:
                self.graced = True
                self.timer.close()
                self.timer = gevent.get_hub().loop.timer(KEEPALIVE_GRACE)
                self.timer.start(self._on_expiration, prev_greenlet, ex)
                return
            super()._on_expiration(prev_greenlet, ex)

    handle = GeventWorker.handle

    def handle_knowing_the_client(worker, listener, client, addr):
        me = gevent.getcurrent()
        clients[me] = client
        try:
            handle(worker, listener, client, addr)
        finally:
            del clients[me]

    GeventWorker.handle = handle_knowing_the_client
    GeventWorker.timeout_ctx = lambda worker: KeepAliveTimeout(worker.cfg.keepalive, clients.get(gevent.getcurrent()))


# gunicorn sends a response's head and its body in two writes: two send calls, and two segments over
# TCP, where one does.  A send is the largest single cost in a worker's profile at sales open (the kernel's
# loopback work for both ends runs in it: 8 % of the workers' samples, half of it heads), and most of our
# answers are one small JSON body.  So the head waits for the first body bytes and goes with them.
def send_head_with_body():
    from gunicorn.http.wsgi import Response

    write = Response.write

    def write_head_with_first_bytes(response, data):
        if response.headers_sent or response.chunked or not data:
            return write(response, data)
        sock, response.sock, sent = response.sock, _Gathered(), response.sent
        try:
            write(response, data)  # gunicorn's bookkeeping (length, HEAD, 204) as ever, into the gathered bytes
        except BaseException:
            # Nothing reached the client: gunicorn may still answer 500 (it does only while no head was sent).
            response.headers_sent, response.sent = False, sent
            raise
        finally:
            gathered, response.sock = response.sock, sock
        sock.sendall(b"".join(gathered.parts))

    Response.write = write_head_with_first_bytes


class _Gathered:
    """Stands in for the socket while gunicorn writes a response's head and first body bytes."""

    def __init__(self):
        self.parts = []

    def sendall(self, data):
        self.parts.append(data)


def post_worker_init(worker):
    """Freeze the loaded app out of the collector's way; on SIGTERM, answer every held wait at once.

    The app, its libraries and their caches (~130,000 tracked objects) live as long as
    the worker: gc.freeze() moves them to the permanent generation, so no full
    collection walks them again (a full pass over the idle worker took ~55 ms).

    SIGTERM: gunicorn's own handler stops the worker accepting (and closes connections
    after their answer); the hub then wakes every waiter, each answered 503 shutting_down
    with a short Retry-After, and the pages reconnect (to the new worker) without counting a hold.
    """
    import gc
    import signal

    import gevent

    from eventi_flask.line.service import LINE
    from eventi_flask.notify.service import HUB

    serve_requests_already_sent()
    send_head_with_body()
    gc.collect()  # garbage of the start-up is freed, not frozen
    gc.freeze()

    from eventi_flask.messages import start_sender

    start_sender(worker.wsgi)  # the tickets' SMS and email, from this worker's event loop (MESSAGES_SENDER)
    hub = worker.wsgi.extensions[HUB]
    admitter = worker.wsgi.extensions[LINE].admitter
    stop_accepting = worker.handle_exit

    def handle_exit(sig, frame):
        stop_accepting(sig, frame)
        gevent.spawn(hub.shut_down)  # out of the signal handler, as gunicorn does for SIGQUIT
        gevent.spawn(admitter.shut_down)  # another worker admits the lines this one did (line/admitter.py)

    signal.signal(signal.SIGTERM, handle_exit)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn's init_signals leaves it
