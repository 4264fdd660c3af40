"""storm: a reconnect storm, as after a deploy: N waits (default 10,000) arriving within about a second.

Each on its own connection, on one worker (PostgreSQL, Redis).  A wait whose
first answer is not a 200 holding it (a 503, any other status, a refused
connection) counts as refused and does not retry; then a success callback for
each held one at --rate (200/s): callback -> answer p50/p99/max.
"""
from . import held

SERVER = held.SERVER


def add_arguments(parser):
    held.add_arguments(parser, n=10000, rate=200, open_rate=10000, open_concurrency=10000)


async def run(args, target):
    result = await held.run(args, target, retry_refused=False)
    result["held_all"] = result["refused"] == 0  # the target; a refusal is slow, not wrong: no failure
    return result


summary = held.summary
