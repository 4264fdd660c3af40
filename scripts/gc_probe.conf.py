"""gunicorn.conf.py plus a garbage-collector probe, for scripts/bench_gc.py only (not for production).

On SIGUSR2 the worker writes one JSON line to $GC_PROBE_OUT: held waits, objects
the collector tracks (and the most common types), the frozen count, and how long
a full collection (gen 2) takes right now, timed twice.
"""
import os

_here = os.path.dirname(os.path.abspath(__file__))
_conf = os.path.join(_here, "..", "gunicorn.conf.py")
exec(compile(open(_conf).read(), _conf, "exec"))  # every production setting and hook, unchanged

_production_post_worker_init = post_worker_init  # noqa: F821 (defined by the exec above)


def post_worker_init(worker):
    _production_post_worker_init(worker)
    import collections
    import gc
    import json
    import signal
    import time

    import gevent

    from eventi_flask.notify.service import HUB

    hub = worker.wsgi.extensions[HUB]

    def probe():
        pauses = []
        for _ in range(2):
            started = time.perf_counter()
            gc.collect(2)
            pauses.append(round((time.perf_counter() - started) * 1000, 1))
        objects = gc.get_objects()
        types = collections.Counter(type(o).__qualname__ for o in objects)
        from eventi_flask.notify.hub import Waiter

        registered = {id(w) for ws in hub._waiters.values() for w in ws}
        strays = [o for o in objects if isinstance(o, Waiter) and id(o) not in registered]
        stray_refs = collections.Counter(type(r).__qualname__ for w in strays[:50] for r in gc.get_referrers(w))
        del strays
        methods = collections.Counter(f"{type(o.__self__).__qualname__}.{o.__func__.__name__}"
                                      for o in objects if type(o).__name__ == "method")
        line = {"methods": methods.most_common(15),
                "stray_waiter_referrers": stray_refs.most_common(10), "waiters": hub.waiter_count, "tracked": len(objects), "frozen": gc.get_freeze_count(),
                "full_gc_ms": pauses, "threshold": gc.get_threshold(),
                "collections": [g["collections"] for g in gc.get_stats()], "types": types.most_common(40)}
        del objects
        with open(os.environ["GC_PROBE_OUT"], "a") as out:
            out.write(json.dumps(line) + "\n")

    signal.signal(signal.SIGUSR2, lambda *_: gevent.spawn(probe))

