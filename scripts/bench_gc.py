#!/usr/bin/env python3
"""What the garbage collector walks per held wait, and what a full collection costs, in a real worker.

    .venv/bin/python scripts/bench_gc.py -n 10000

Starts gunicorn as scripts/loadtest.py does (one gevent worker, PostgreSQL,
Redis), but with scripts/gc_probe.conf.py: the production gunicorn.conf.py plus
a SIGUSR2 probe.  Creates N orders, probes the idle worker, holds one wait per
order over raw sockets, probes again: tracked objects per held wait (the
difference over N), the full-collection time idle and holding, and the types
that grew most.
"""
import argparse
import concurrent.futures
import json
import os
import resource
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tests.support as support  # noqa: E402

ORDER = {"event": "test-this-end-to-end", "ticket_type": "early-bird", "quantity": 1,
         "name": "GC Probe", "email": "gc@example.com", "phone": "0708000004"}  # never called back


def metric(url, name):
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def probe(worker, out, seen):
    os.kill(worker, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lines = out.read_text().splitlines() if out.exists() else []
        if len(lines) > seen:
            return json.loads(lines[seen])
        time.sleep(0.1)
    raise SystemExit("no answer from the probe")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=10000, help="held waits (default 10000)")
    parser.add_argument("--open-rate", type=float, default=250, help="waits opened per second (default 250)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    workdir = Path(tempfile.mkdtemp(prefix="eventi-gc-"))
    out = workdir / "probe.jsonl"
    env = {"WEB_CONCURRENCY": "1", "LOG_LEVEL": "warning", "REDIS_PREFIX": f"gc:{uuid.uuid4().hex[:8]}:",
           "GC_PROBE_OUT": str(out), **dict(item.split("=", 1) for item in args.server_env)}
    production, web = support.procfile_command, support.procfile_command("web")
    support.procfile_command = lambda process="web": (  # the Procfile's web line, with the probe's config
        [("scripts/gc_probe.conf.py" if arg == "gunicorn.conf.py" else arg) for arg in web] if process == "web"
        else production(process))
    server = support.LiveServer(env, workdir / "gunicorn.log")
    server.start(timeout=60)
    socks = []
    try:
        worker = int(Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()[0])
        with requests.Session() as session, concurrent.futures.ThreadPoolExecutor(8) as pool:
            orders = list(pool.map(lambda _: session.post(server.url + "/api/orders", json=ORDER, timeout=30).json(),
                                   range(args.n)))
        idle = probe(worker, out, 0)
        for order in orders:
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(f"GET /api/orders/{order['id']}/wait?timeout=60&since={order['version']} HTTP/1.1\r\n"
                         f"Host: 127.0.0.1\r\n\r\n".encode())
            socks.append(sock)
            time.sleep(1 / args.open_rate)
        deadline = time.monotonic() + 120
        while metric(server.url, "eventi_waiters") != args.n:
            if time.monotonic() > deadline:
                raise SystemExit("the waits were not all held")
            time.sleep(0.5)
        holding = probe(worker, out, 1)
    finally:
        for sock in socks:
            sock.close()
        server.stop()

    per_wait = (holding["tracked"] - idle["tracked"]) / args.n
    print(f"threshold {holding['threshold']}, frozen (permanent generation) {holding['frozen']}; collections by "
          f"generation while the waits were opened: "
          f"{[after - before for after, before in zip(holding['collections'], idle['collections'])]} "
          f"(each includes the probe's own 2 full ones)")
    print(f"idle:    {idle['tracked']:>9,} tracked objects, full collection {idle['full_gc_ms']} ms")
    print(f"holding: {holding['tracked']:>9,} tracked objects with {holding['waiters']:,} waits held, "
          f"full collection {holding['full_gc_ms']} ms")
    print(f"per held wait: {per_wait:.1f} tracked objects; stray waiters' referrers {holding['stray_waiter_referrers']}")
    print("bound methods per held wait:", ", ".join(f"{name} {count / args.n:.2f}"
                                                    for name, count in holding["methods"] if count >= args.n / 2))
    before = dict(idle["types"])
    grew = sorted(((count - before.get(name, 0), name) for name, count in holding["types"]), reverse=True)
    print("per held wait, by type: " + ", ".join(f"{name} {delta / args.n:.2f}" for delta, name in grew[:20]
                                                 if delta > 0))


if __name__ == "__main__":
    main()
