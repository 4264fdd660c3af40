"""A deploy: gunicorn stopping (SIGTERM) answers its held waits 503 shutting_down, so pages reconnect."""
import time

import gevent

from tests.support import get_wait, held_waits, wait_until


def test_a_wait_held_across_a_sigterm_is_answered_503_shutting_down_at_once(live_server_factory):
    server = live_server_factory(WEB_CONCURRENCY="1")
    order = server.create_order(phone="0708000004")  # the sandbox never calls back
    waiting = gevent.spawn(get_wait, server, order, 50)
    wait_until(lambda: held_waits(server, 1), message="the wait to be held")

    stopping = time.monotonic()
    server.proc.terminate()  # what a deploy sends
    answer = waiting.get(timeout=10)
    assert time.monotonic() - stopping < 2, "answered at once, not when the hold ran out"
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "shutting_down"
    assert 1 <= int(answer.headers["Retry-After"]) <= 5
    server.proc.wait(15)  # and it stops well inside gunicorn's graceful window
