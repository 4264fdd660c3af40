"""The server under load, and what it tells us: started the one way production starts, then watched.

`serve` starts the Procfile's release step, `flask seed-demo` and the web line
(gunicorn, N gevent workers) on a fresh PostgreSQL database or an SQLite file,
with Redis, without it, or on a 3-primary Redis Cluster; or points at a
running server (--url).  `Usage` reads each worker's CPU from /proc around the
measured part; `scrape` reads /metrics.
"""
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


class Target(dict):
    """The server under load: url, host, port, master_pid, worker_pids, workers, database_url, redis_url (and,
    with --deliver, its message providers' stand-ins: delivery, stand_ins_pid)."""

    @property
    def worker_pid(self):
        return self["worker_pids"][0] if self["worker_pids"] else None


def worker_pids_of(master_pid):
    try:
        return [int(pid) for pid in Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()]
    except OSError:
        return []


def server_env(args, defaults):
    """The environment of the server we start: the mode's defaults, then --server-env."""
    env = {"LOG_LEVEL": "warning", "REDIS_PREFIX": f"bench:{uuid.uuid4().hex[:8]}:", **defaults}
    env["WEB_CONCURRENCY"] = str(args.workers or defaults.get("WEB_CONCURRENCY", 1))
    if args.database == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{tempfile.mkdtemp(prefix='eventi-bench-')}/bench.sqlite3"
    if args.no_redis:
        env["REDIS_URL"] = None  # LiveServer drops it: the in-process hub, one worker only
    for item in args.server_env:
        name, _, value = item.partition("=")
        env[name] = value
    return env


@contextlib.contextmanager
def serve(args, defaults, redis_url=None):
    """A Target for the run: the --url server, or one started for it (stopped and its database dropped after)."""
    if args.url:
        split = urlsplit(args.url)
        pids = [args.worker_pid] if args.worker_pid else []
        yield Target(url=args.url.rstrip("/"), host=split.hostname, port=split.port or 80, master_pid=None,
                     worker_pids=pids, workers=len(pids) or None, database_url=args.database_url,
                     redis_url=redis_url or args.redis_url)
        return
    sys.path.insert(0, str(ROOT))
    from tests.support import LiveServer

    env = server_env(args, defaults)
    if redis_url and not args.no_redis:
        env["REDIS_URL"] = redis_url
    workers = int(env["WEB_CONCURRENCY"])
    log_path = Path(tempfile.mkdtemp(prefix="eventi-bench-")) / "gunicorn.log"
    server = LiveServer(env, log_path).start(timeout=60)
    try:
        pids = []
        deadline = time.monotonic() + 10
        while len(pids) < workers and time.monotonic() < deadline:
            pids = worker_pids_of(server.proc.pid)
            time.sleep(0.05)
        print(f"server {server.url}, {workers} worker(s) {pids}, log {log_path}", file=sys.stderr)
        yield Target(url=server.url, host="127.0.0.1", port=server.port, master_pid=server.proc.pid,
                     worker_pids=pids, workers=workers, database_url=server.env["DATABASE_URL"],
                     redis_url=server.env.get("REDIS_URL"), redis_prefix=server.env.get("REDIS_PREFIX", ""),
                     log=str(log_path))
    finally:
        server.stop()


@contextlib.contextmanager
def redis_cluster():
    """A 3-primary Redis Cluster of our own on spare ports (the one the tests use); its URL."""
    sys.path.insert(0, str(ROOT))
    from tests.redis_cluster import RedisCluster

    cluster = RedisCluster(Path(tempfile.mkdtemp(prefix="eventi-bench-cluster-"))).start()
    print(f"Redis Cluster: {' '.join(n.address for n in cluster.nodes)}", file=sys.stderr)
    try:
        yield cluster.url
    finally:
        cluster.stop()


def database_engine(url):
    """An SQLAlchemy engine on the server's database, for the checks that read it (dispose of it after)."""
    from sqlalchemy import create_engine

    from config import database_url

    return create_engine(database_url(url))


# ---------------------------------------------------------------- /proc

def cpu_seconds(pid):
    """User + system CPU time the process has used so far (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def machine_busy_jiffies():
    """(busy, all) jiffies of every CPU since boot, from /proc/stat (steal counted busy: not ours to use)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


class Usage:
    """CPU of each worker, of this load generator and of the delivery stand-ins (--deliver: a child process of
    their own) over the measured part of a run, peak RSS, the whole machine's busy share, and how late this
    generator's own event loop ran (a late loop measures its own lateness into every answer time)."""

    LAG_PROBE_S = 0.02

    def __init__(self, target):
        self.pids = list(target["worker_pids"])
        self.stand_ins_pid = target.get("stand_ins_pid")
        self.rss_peak = 0.0
        self.fds_peak = 0
        self._sampler = None

    def start(self):
        self.cpu0 = [cpu_seconds(pid) for pid in self.pids]
        self.client0 = time.process_time()
        self.stand_ins0 = cpu_seconds(self.stand_ins_pid) if self.stand_ins_pid else None
        self.wall0 = time.monotonic()
        self.machine0 = machine_busy_jiffies()
        self.lags_ms = []
        self.timeline = []  # the workers' CPU seconds in each quarter second
        self._lag_probe = asyncio.ensure_future(self._probe_lag())
        if self.pids:
            self._sampler = asyncio.ensure_future(self._sample())
        return self

    async def _probe_lag(self):
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.LAG_PROBE_S)
            self.lags_ms.append((time.perf_counter() - started - self.LAG_PROBE_S) * 1000)

    async def _sample(self):
        last = self.cpu0
        while True:
            now = [cpu_seconds(pid) for pid in self.pids]
            self.timeline.append(sum(b - a for a, b in zip(last, now) if a is not None and b is not None))
            last = now
            self.rss_peak = max(self.rss_peak, sum(rss_mb(pid) or 0 for pid in self.pids))
            self.fds_peak = max(self.fds_peak, sum(open_fds(pid) or 0 for pid in self.pids))
            await asyncio.sleep(0.25)

    def stop(self):
        """{"worker_cpu_s": [...], "worker_cpu_percent": [...], "client_cpu_s", "stand_ins_cpu_s" (None without
        them), "wall_s", peaks}."""
        if self._sampler:
            self._sampler.cancel()
        from .results import spread  # results imports this module

        self._lag_probe.cancel()
        wall = time.monotonic() - self.wall0
        busy, every = (b - a for a, b in zip(self.machine0, machine_busy_jiffies()))
        used = [None if a is None or b is None else b - a
                for a, b in zip(self.cpu0, (cpu_seconds(pid) for pid in self.pids))]
        stand_ins = cpu_seconds(self.stand_ins_pid) if self.stand_ins0 is not None else None
        return {
            "wall_s": round(wall, 2),
            "worker_cpu_s": [None if u is None else round(u, 2) for u in used],
            "worker_cpu_percent": [None if u is None else round(100 * u / wall, 1) for u in used],
            "client_cpu_s": round(time.process_time() - self.client0, 2),
            "client_loop_lag_ms": spread(self.lags_ms),
            "machine_busy_percent": round(100 * busy / every, 1) if every else None,
            "stand_ins_cpu_s": None if stand_ins is None else round(stand_ins - self.stand_ins0, 2),
            # the workers' CPU, % of one core, in each second of the run: a burst's saturation shows here
            "worker_cpu_percent_by_second": [round(sum(self.timeline[i:i + 4]) * 100)
                                             for i in range(1, len(self.timeline), 4)],
            "worker_rss_mb_peak": round(self.rss_peak, 1) if self.pids else None,
            "worker_open_files_peak": self.fds_peak if self.pids else None,
        }


def worker_cpu_total(usage):
    values = [v for v in usage["worker_cpu_s"] if v is not None]
    return sum(values) if values else None


# ---------------------------------------------------------------- Redis

def node_urls(redis_url):
    """The URL of every primary when `redis_url` names a Redis Cluster node, else [redis_url]."""
    import redis

    with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
        if client.info("cluster").get("cluster_enabled") != 1:
            return [redis_url]
        ranges = client.execute_command("CLUSTER SLOTS")
    scheme = urlsplit(redis_url).scheme
    return [f"{scheme}://{host}:{port}" for host, port in sorted({(r[2][0].decode() or "127.0.0.1", r[2][1])
                                                                 for r in ranges})]


def local_tcp_ports(pid):
    """The local ports of the TCP sockets process `pid` holds."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = row.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def redis_connections(redis_url, pid):
    """{"subscriber": n, "other": n}: the Redis connections worker `pid` holds (CLIENT LIST on every node)."""
    import redis

    if not redis_url or not pid:
        return None
    clients = []
    for url in node_urls(redis_url):
        with redis.Redis.from_url(url, socket_timeout=5) as client:
            clients += client.client_list()
    ports = local_tcp_ports(pid)
    subscriber = sum(1 for c in clients if c.get("name") == f"eventi-sub-{pid}")
    mine = sum(1 for c in clients if int(c["addr"].rsplit(":", 1)[1]) in ports)
    return {"subscriber": subscriber, "other": mine - subscriber}


# ---------------------------------------------------------------- /metrics

def parse_metrics(text):
    """{metric name with labels: value} from Prometheus text."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


async def scrape(pool):
    from .client import HttpError

    answer = await pool.request("GET", "/metrics")
    if answer.status != 200:
        raise HttpError(f"/metrics answered {answer.status}")
    return parse_metrics(answer.body.decode())


def histogram_quantile(before, after, name, q):
    """The upper bound (le, in ms) of the bucket holding quantile q of a Prometheus histogram between two scrapes."""
    buckets = []
    for key, value in after.items():
        if key.startswith(name + "_bucket{"):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), value - before.get(key, 0)))
    buckets.sort()
    if not buckets or not buckets[-1][1]:
        return None
    for le, count in buckets:
        if count >= q / 100 * buckets[-1][1]:
            return le * 1000
    return None


def gc_pauses(before, after):
    """Full (generation 2) collections in the worker between two scrapes: how many, total and longest pause."""
    key = 'eventi_gc_pause_seconds_%s{generation="2"}'
    count = after.get(key % "count", 0) - before.get(key % "count", 0)
    total = after.get(key % "sum", 0) - before.get(key % "sum", 0)
    full = {k: v for k, v in after.items() if 'generation="2"' in k}
    longest = histogram_quantile({k: v for k, v in before.items() if 'generation="2"' in k}, full,
                                 "eventi_gc_pause_seconds", 100)
    return {"gc_full_collections": int(count), "gc_full_pause_ms_total": round(total * 1000, 2),
            "gc_full_pause_ms_max_le": longest}


# ---------------------------------------------------------------- py-spy

def frame_name(frame):
    """"function (/.../site-packages/pkg/module.py:123)" -> "function (pkg/module.py)"."""
    name = re.sub(r":\d+\)$", ")", frame.strip())
    name = re.sub(r"\(/.*?/(site-packages|lib/python3\.\d+)/", "(", name)
    return name.replace(f"({ROOT}/", "(")


class Profiler:
    """py-spy on every worker for the measured part of a run (--profile FILE: collapsed stacks, then a summary)."""

    IDLE = ("run (gevent/hub.py)", "wait (gevent/_hub_primitives.py)")  # the hub waiting for I/O

    def __init__(self, path, target, rate=250):
        self.path, self.proc = path, None
        pid = target.get("master_pid") or target.worker_pid
        if path and pid:
            py_spy = Path(sys.executable).parent / "py-spy"
            self.proc = subprocess.Popen(
                [str(py_spy), "record", "--pid", str(pid), "--subprocesses", "--rate", str(rate), "--nonblocking",
                 "--format", "raw", "--output", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)  # let it attach before the load starts

    def stop(self, top=15):
        """Stop recording; the busiest functions (self time, idle hub excluded) as [(share, function)]."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        own, busy = {}, 0
        for line in Path(self.path).read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():  # a line cut short when py-spy stopped
                continue
            frames = [frame_name(f) for f in stack.split(";") if f.strip()]
            if not frames or any(idle in frames[-1] for idle in self.IDLE):
                continue
            busy += int(count)
            own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        ranked = sorted(own.items(), key=lambda item: -item[1])[:top]
        return [(round(count / busy, 3), frame) for frame, count in ranked]
