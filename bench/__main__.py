"""python -m bench MODE [options]: one entry point for every benchmark (and `charts` to draw them).

Without --url each run starts its own server the way production does (the
Procfile's release and web lines, gunicorn with gevent workers, a fresh
PostgreSQL database or SQLite file, with Redis or without, or on a Redis
Cluster) and stops it after.  Every run prints one summary line; all runs go to
one JSON file (bench-results/<mode>-<time>.json, or --json).  Exit status 1
when a run saw something wrong (a wrong outcome, a duplicate order, oversold
tickets), 0 otherwise, however slow.
"""
import argparse
import asyncio
import contextlib
import importlib
import resource
import sys

from .delivery import providers
from .server import DEFAULT_REDIS_URL, redis_cluster, serve

MODES = {
    "held": "held waits, then callbacks at --rate: callback -> answer (--short-poll for the old page)",
    "storm": "a reconnect storm: 10,000 waits within a second on one worker; refused vs held, then callbacks",
    "journeys": "buyers arriving at --rate: order, sandbox payment, wait for the outcome",
    "overload": "journeys at twice capacity: shed answers retried with the same Idempotency-Key",
    "line": "sales open past capacity: buyers held in the event's line (202), admitted in order, then paying",
    "drop": "a ticket drop: buyers POSTing at once; oversold or held-without-201 tickets",
    "callbacks": "webhook throughput at --rate",
    "cluster": "held waits on a 3-primary Redis Cluster; each node's share of the pub/sub traffic",
    "resets": "a PayHero-like keep-alive sender at 200/s during a 600/s overload: connections reset, callbacks lost",
    "floor": "the worker's CPU a request on a route that does almost nothing: what every answer costs at least",
}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, exit 2 (argparse's own also prints the usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_server_arguments(parser):
    server = parser.add_argument_group("the server")
    server.add_argument("--url", help="a running server instead of one started per run")
    server.add_argument("--worker-pid", type=int, help="with --url: its worker's pid, for CPU and memory")
    server.add_argument("--database-url", help="with --url: its database, for the checks that read it")
    server.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="with --url: its Redis")
    server.add_argument("--workers", type=int, help="gunicorn workers (default: the mode's)")
    server.add_argument("--database", choices=("postgres", "sqlite"), default="postgres",
                        help="a fresh PostgreSQL database (default) or SQLite file per run")
    server.add_argument("--no-redis", action="store_true", help="no REDIS_URL: the in-process hub (one worker)")
    server.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="more environment for the server (repeatable), e.g. LOG_LEVEL=info")
    server.add_argument("--token", default="sandbox", help="PAYHERO_CALLBACK_TOKEN")
    out = parser.add_argument_group("the runs")
    out.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh server (default 1)")
    out.add_argument("--json", help="where to write the results (default bench-results/<mode>-<time>.json)")
    out.add_argument("--profile", metavar="FILE", help="py-spy the workers during the load (collapsed stacks)")
    out.add_argument("--profile-rate", type=int, default=250, metavar="HZ",
                     help="py-spy's samples a second (default 250; on 2 cores under a full load, 50 slows the "
                          "workers less)")


def parser():
    top = Parser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    modes = top.add_subparsers(dest="mode", required=True, metavar="MODE")
    for name, help_text in MODES.items():
        module = importlib.import_module(f"bench.{name}")
        sub = modes.add_parser(name, help=help_text, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        add_server_arguments(sub)
    charts = importlib.import_module("bench.charts")
    charts.add_arguments(modes.add_parser("charts", help=charts.__doc__.split("\n")[0], description=charts.__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter))
    return top


def check(top, args):
    """Refuse, in one line, what would only fail later."""
    if args.url and (args.workers or args.no_redis or args.server_env or args.database != "postgres"):
        top.error("--workers, --database, --no-redis and --server-env configure a server we start: not with --url")
    if args.url and getattr(args, "messages", "sandbox") != "sandbox":
        top.error("--messages (--deliver) configures a server we start: not with --url")
    if args.no_redis and (args.workers or 1) > 1:
        top.error("--no-redis needs one worker (the in-process hub reaches only its own)")
    for item in args.server_env:
        if "=" not in item:
            top.error(f"--server-env wants NAME=VALUE, got {item!r}")
    for name in ("repeat", "n", "buyers", "concurrency", "connections"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            top.error(f"--{name} must be at least 1")
    for name in ("rate", "open_rate"):
        if getattr(args, name, 0) < 0 or (name == "open_rate" and getattr(args, name, 1) == 0):
            top.error(f"--{name.replace('_', '-')} must be positive")
    if args.mode in ("journeys", "overload", "resets", "line") and args.rate <= 0:
        top.error("--rate must be positive")
    if args.mode == "line" and not (0 <= args.leave_share <= 1 and args.patience > 0):
        top.error("--leave-share must be between 0 and 1, and --patience positive")


def main(argv=None):
    top = parser()
    args = top.parse_args(argv)
    if args.mode == "charts":
        return importlib.import_module("bench.charts").main(args)
    check(top, args)
    module = importlib.import_module(f"bench.{args.mode}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # a socket per simulated phone
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    from .results import write_report

    runs = []
    with redis_cluster() if getattr(module, "USES_CLUSTER", False) and not args.url else contextlib.nullcontext() as cluster_url:
        for i in range(args.repeat):
            with providers(args) as (provider_env, provider_entries), \
                    serve(args, {**module.SERVER, **provider_env}, cluster_url) as target:
                target.update(provider_entries)
                result = asyncio.run(module.run(args, target))
            result["target"] = {k: v for k, v in target.items() if k in ("url", "workers", "worker_pids")}
            runs.append(result)
            print(f"{args.mode} run {i + 1}/{args.repeat}: {module.summary(result)}", flush=True)
    path = write_report(args.mode, args, runs, args.json)
    print(f"results: {path}", file=sys.stderr)
    failures = [f for run in runs for f in run.get("failures", [])]
    for failure in failures:
        print(f"{args.mode}: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
