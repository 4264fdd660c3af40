"""overload: whole journeys at about twice capacity (--rate 600 by default).

The journeys run, with its retries: a 503 busy or 429 is retried after
Retry-After with the same Idempotency-Key.  What counts here: every POST
answer's p99 (shed ones included), the share shed, buyers served exactly once
and the time to be served (p99, max; within 30 s), and duplicate orders (must be 0).
"""
from . import journeys

SERVER = journeys.SERVER


def add_arguments(parser):
    journeys.add_arguments(parser, rate=600, buyers=3000)


run = journeys.run
summary = journeys.summary
