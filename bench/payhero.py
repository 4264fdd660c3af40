"""PayHero's side when the load test pays: success callbacks, open loop, at a set rate.

The orders are on the sandbox phone that never calls back (client.NO_CALLBACK_PHONE),
so these are the only callbacks.  Callback i leaves at start + i/rate whatever
happened to the others; a late one says how late (send lag).
"""
import asyncio
import json

from eventi_flask.payhero.sandbox import SUCCESS, classic_callback

from .client import HttpError
from .results import percentile, rounded


def callback_body(order):
    payment = order["payment"]
    return json.dumps(classic_callback(payment["reference"], payment["checkout_request_id"], order["id"],
                                       order["amount"], "254708000004", *SUCCESS)).encode()


async def pay(pool, watches, rate, token):
    """Post a success callback for each watch's order at `rate` per second (0: back to back); stats."""
    path = f"/api/payhero/callback?token={token}"
    errors, lags = [], []

    async def one(watch):
        def sent():
            watch.callback_sent_at = asyncio.get_running_loop().time()

        try:
            answer = await pool.request("POST", path, callback_body(watch.order), on_sent=sent)
        except (OSError, HttpError) as exc:
            errors.append(repr(exc))
            return
        watch.callback_ms = (asyncio.get_running_loop().time() - watch.callback_sent_at) * 1000
        if answer.status != 200 or answer.json().get("status") != "completed":
            errors.append(f"{answer.status} {answer.body[:200]!r}")

    loop = asyncio.get_running_loop()
    started, tasks = loop.time(), []
    for i, watch in enumerate(watches):
        if rate:
            due = started + i / rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            lags.append((loop.time() - due) * 1000)
        tasks.append(asyncio.ensure_future(one(watch)))
        if not rate and len(tasks) % pool.size == 0:
            await asyncio.sleep(0)  # let the pool's connections go round
    await asyncio.gather(*tasks)
    done = max((w.callback_sent_at + w.callback_ms / 1000 for w in watches if w.callback_ms is not None),
               default=started)
    return {
        "callbacks": len(watches),
        "callbacks_per_second": rounded(len(watches) / (done - started)) if done > started else None,
        "callback_send_lag_ms_p99": rounded(percentile(lags, 99)),
        "callback_errors": len(errors),
        "first_callback_errors": errors[:5],
        "seconds": rounded(done - started),
    }
