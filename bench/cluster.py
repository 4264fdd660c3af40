"""cluster: the held run on a 3-primary Redis Cluster started for it (sharded pub/sub).

Prints each node's share of the pub/sub traffic during the callbacks (INFO
commandstats and CLUSTER INFO's bus counters); --classic-contrast then
publishes as many order-sized messages with classic PUBLISH on the same
cluster, which every node carries.
"""
import time
from urllib.parse import urlsplit

from . import held
from .server import node_urls

SERVER = held.SERVER
USES_CLUSTER = True


def add_arguments(parser):
    held.add_arguments(parser)
    parser.add_argument("--classic-contrast", action="store_true",
                        help="then classic PUBLISH as many messages, for each node's share")


def pubsub_counters(redis_url):
    """{node: counters} of the pub/sub traffic each node has carried so far."""
    import redis

    counters = {}
    for url in node_urls(redis_url):
        with redis.Redis.from_url(url, socket_timeout=5) as client:
            commands, stats = client.info("commandstats"), client.info("stats")
            bus = client.execute_command("CLUSTER INFO")
        counters[urlsplit(url).netloc] = {
            "publish_calls": commands.get("cmdstat_publish", {}).get("calls", 0),
            "spublish_calls": commands.get("cmdstat_spublish", {}).get("calls", 0),
            # Messages that reached this node over the cluster bus (classic PUBLISH goes to every node).
            "bus_publish_received": int(bus.get("cluster_stats_messages_publish_received", 0)),
            "bus_publishshard_received": int(bus.get("cluster_stats_messages_publishshard_received", 0)),
            "net_output_bytes": stats.get("total_net_output_bytes", 0),
        }
    return counters


def shares(before, after):
    """Per node: what it carried between the two readings, and its share of the publishes."""
    deltas = {node: {k: after[node][k] - before[node].get(k, 0) for k in after[node]} for node in after if node in before}
    for counters in deltas.values():
        counters["messages"] = (counters["publish_calls"] + counters["spublish_calls"]
                                + counters["bus_publish_received"] + counters["bus_publishshard_received"])
    total = sum(c["publish_calls"] + c["spublish_calls"] for c in deltas.values()) or 1
    for counters in deltas.values():
        counters["share_of_publishes"] = round(counters["messages"] / total, 3)
    return deltas


def classic_contrast(redis_url, n, rate, payload_bytes=900):
    """Classic PUBLISH of n order-sized messages, spread over the primaries: what each node carries."""
    import redis

    clients = [redis.Redis.from_url(url, socket_timeout=5) for url in node_urls(redis_url)]
    before = pubsub_counters(redis_url)
    started = time.monotonic()
    for i in range(n):
        if rate:
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
        clients[i % len(clients)].publish(f"bench:classic:order:status:{i}", "x" * payload_bytes)
    for client in clients:
        client.close()
    return shares(before, pubsub_counters(redis_url))


async def run(args, target):
    before = pubsub_counters(target["redis_url"])
    result = await held.run(args, target)
    result["pubsub_by_node"] = shares(before, pubsub_counters(target["redis_url"]))
    result["pubsub_busiest_node_share"] = max(c["share_of_publishes"] for c in result["pubsub_by_node"].values())
    if args.classic_contrast:
        result["classic_publish_by_node"] = classic_contrast(target["redis_url"], args.n, args.rate)
    return result


def summary(result):
    nodes = ", ".join(f"{node} {c['share_of_publishes']:.0%}" for node, c in result["pubsub_by_node"].items())
    classic = result.get("classic_publish_by_node")
    contrast = "; classic PUBLISH: " + ", ".join(f"{node} {c['share_of_publishes']:.0%}" for node, c in classic.items()) \
        if classic else ""
    return f"{held.summary(result)}; pub/sub share by node: {nodes}{contrast}"
