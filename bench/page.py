"""What the payment status page does, on its own connection: hold the wait until the order is final.

As eventi.js does: ask with since=<version>; a hold that ran its course is asked
again; a 429/503 (or a lost connection) is retried after Retry-After (or a short
jittered backoff), unless the mode counts the first refusal and stops (storm).
"""
import asyncio
import json
import random
import time

from .client import Conn, HttpError, wait_path
from .results import count_by


class Watch:
    """One order's story as its page saw it."""

    __slots__ = ("order", "requests", "holds_ran_out", "refusals", "retries", "status", "answered_at",
                 "answered_wall", "final", "error", "callback_sent_at", "callback_ms")

    def __init__(self, order):
        self.order = order
        self.requests = self.holds_ran_out = self.retries = 0
        self.refusals = []  # status codes (or error names) of answers that were not a 200
        self.status = self.answered_at = self.answered_wall = self.final = self.error = None
        self.callback_sent_at = self.callback_ms = None

    @property
    def held(self):
        """Held from the first ask to the outcome, never refused."""
        return self.answered_at is not None and not self.refusals

    def ms_since_callback(self):
        if self.answered_at is None or self.callback_sent_at is None:
            return None
        return (self.answered_at - self.callback_sent_at) * 1000


def backoff(failures):
    """As the page: 1, 2, 4 s... up to 8 s, with jitter so reconnecting phones do not stampede."""
    return min(8.0, 2 ** (failures - 1)) * random.uniform(0.75, 1.25)


async def ask(conn, path, opening=None):
    """One GET on a page's connection: (the answer, None) when 200, else (the answer or None, the refusal: its
    status or the error's name).  `opening`, a semaphore, limits how many connections open at once."""
    try:
        if not conn.is_open and opening is not None:
            async with opening:
                await conn.open()
        answer = await conn.request("GET", path)
    except (OSError, HttpError) as exc:
        return None, type(exc).__name__
    return answer, None if answer.status == 200 else answer.status


async def reconnect_after(conn, answer, failures):
    """As a page's fetch after an error: a new connection, after Retry-After or a short jittered backoff."""
    conn.close()
    await asyncio.sleep(answer.retry_after() if answer and "retry-after" in answer.headers else backoff(failures))


async def follow(host, port, watch, timeout, deadline, retry_refused=True, opening=None, conn=None):
    """Hold waits for `watch.order` until it is final, the loop's `deadline` passes, or (not retry_refused) a refusal."""
    conn = conn or Conn(host, port)
    version = watch.order["version"]
    failures = 0
    loop = asyncio.get_running_loop()
    try:
        while True:
            if loop.time() > deadline:
                watch.error = "still pending at the end of the run"
                return
            watch.requests += 1
            answer, refusal = await ask(conn, wait_path(watch.order["id"], version, timeout), opening)
            if refusal is not None:
                watch.refusals.append(refusal)
                if not retry_refused:
                    watch.error = f"{refusal} {answer.body[:120]!r}" if answer else refusal
                    return
                failures += 1
                watch.retries += 1
                await reconnect_after(conn, answer, failures)
                continue
            failures = 0
            order = json.loads(answer.body)
            if order["status"] != "pending":
                watch.answered_at, watch.answered_wall, watch.status = loop.time(), time.time(), order["status"]
                watch.final = order
                return
            if order["version"] == version:
                watch.holds_ran_out += 1
            version = order["version"]
    except asyncio.CancelledError:
        watch.error = watch.error or "cancelled at the end of the run"
        raise
    except ValueError as exc:
        watch.error = repr(exc)
    finally:
        conn.close()


def story(watches):
    """What the pages saw, counted."""
    return {
        "pages": len(watches),
        "answered": sum(1 for w in watches if w.answered_at is not None),
        "held_without_refusal": sum(1 for w in watches if w.held),
        "refused": sum(1 for w in watches if w.refusals),
        "refusals_by_status": count_by(r for w in watches for r in w.refusals),
        "retries": sum(w.retries for w in watches),
        "holds_ran_out": sum(w.holds_ran_out for w in watches),
        "wait_requests_per_page": round(sum(w.requests for w in watches) / len(watches), 3) if watches else None,
        "errors": sum(1 for w in watches if w.error),
        "first_errors": [w.error for w in watches if w.error][:5],
    }
