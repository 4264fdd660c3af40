"""A Redis Cluster of our own for tests: three primaries on spare loopback ports, no replicas."""
import shutil
import subprocess

import redis

from tests.support import free_port, wait_until


class ClusterNode:
    def __init__(self, workdir, tls=None):
        self.port, self.bus_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tls = tls  # (certificate, key) paths: clients and the cluster bus speak TLS only
        self.url = f"rediss://{self.address}/0?ssl_cert_reqs=none" if tls else f"redis://{self.address}/0"
        self.workdir = workdir / str(self.port)
        self.workdir.mkdir(parents=True)
        self.proc = None

    def start(self):
        ports = ["--port", str(self.port)]
        if self.tls:
            cert, key = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cluster", "yes", "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
        # nodes.conf in the node's own directory keeps its id and slots across a restart.
        self.proc = subprocess.Popen(
            ["redis-server", *ports, "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-port", str(self.bus_port), "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", "2000", "--dir", str(self.workdir), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, 10, 0.05, f"redis-server on port {self.port}")

    def client(self):
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=1)

    def answers(self):
        try:
            with self.client() as client:
                return client.ping()
        except redis.RedisError:
            return False

    def state(self):
        with self.client() as client:
            return client.execute_command("CLUSTER INFO").get("cluster_state")

    def node_id(self):
        with self.client() as client:
            return client.execute_command("CLUSTER MYID").decode()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)


class RedisCluster:
    def __init__(self, workdir, primaries=3, tls=None):
        self.nodes = [ClusterNode(workdir, tls) for _ in range(primaries)]
        self.tls = tls

    @property
    def url(self):
        return self.nodes[0].url

    def start(self):
        for node in self.nodes:
            node.start()
        subprocess.run(["redis-cli", *(["--tls", "--insecure"] if self.tls else []), "--cluster", "create",
                        *(n.address for n in self.nodes), "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        wait_until(self.healthy, 30, 0.1, "the cluster to be ok on every node")
        return self

    def healthy(self):
        try:
            return all(node.state() == "ok" for node in self.nodes)
        except redis.RedisError:
            return False

    def slot_ranges(self):
        """[(first slot, last slot, node serving them)] as the first answering node sees it."""
        for node in self.nodes:
            try:
                with node.client() as client:
                    ranges = client.execute_command("CLUSTER SLOTS")
            except redis.RedisError:
                continue
            return [(r[0], r[1], next(n for n in self.nodes if n.port == r[2][1])) for r in ranges]
        raise AssertionError("no cluster node answers")

    def owner(self, slot, ranges=None):
        """The node serving `slot`."""
        for first, last, node in ranges or self.slot_ranges():
            if first <= slot <= last:
                return node
        raise AssertionError(f"no node serves slot {slot}")

    def move_slot(self, slot, target):
        """Move `slot` and its keys to `target`, as redis-cli --cluster reshard does."""
        self.begin_migration(slot, target)
        self.finish_migration(slot, target)

    def begin_migration(self, slot, target):
        """Mark `slot` migrating to `target` and move its keys there; it is still served by its owner."""
        source = self.owner(slot)
        with source.client() as src, target.client() as dst:
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source.node_id())
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target.node_id())
            while True:
                keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
                if not keys:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)

    def finish_migration(self, slot, target):
        source = self.owner(slot)
        for node in (target, source, *(n for n in self.nodes if n not in (source, target))):
            with node.client() as client:
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", target.node_id())
        wait_until(lambda: self.owner(slot) is target, 10, message=f"slot {slot} to move")

    def stop(self):
        for node in self.nodes:
            node.stop()


def self_signed_certificate(workdir):
    """(certificate, key) for 127.0.0.1, made by openssl now."""
    cert, key = workdir / "redis.crt", workdir / "redis.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True, timeout=60)
    return cert, key


def redis_server_available():
    return shutil.which("redis-server") and shutil.which("redis-cli")


