"""Waking held requests when an order changes: the backends and the after-commit publisher."""
from . import service
from .cluster_hub import ClusterHub, is_cluster
from .local_hub import LocalHub
from .redis_hub import RedisHub


def create_hub(config):
    limits = dict(
        max_per_order=config["WAIT_MAX_PER_ORDER"],
        max_per_worker=config["WAIT_MAX_PER_WORKER"],
        recheck_interval=config["WAIT_RECHECK_INTERVAL"],
        degraded_interval=config["WAIT_RECHECK_INTERVAL_DEGRADED"],
    )
    url = config.get("REDIS_URL")
    if not url:
        return LocalHub(**limits)
    # A cluster node says so in INFO cluster; nothing else to configure.
    hub_class = ClusterHub if is_cluster(url) else RedisHub
    return hub_class(url, config.get("REDIS_PREFIX", ""), **limits)


def init_app(app):
    app.extensions[service.HUB] = create_hub(app.config)
