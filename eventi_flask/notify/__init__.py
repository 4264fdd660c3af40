"""Waking held requests when an order changes: the backends and the after-commit publisher."""
from . import service
from .local_hub import LocalHub
from .redis_hub import RedisHub


def create_hub(config):
    limits = dict(
        max_per_order=config["WAIT_MAX_PER_ORDER"],
        max_per_worker=config["WAIT_MAX_PER_WORKER"],
        recheck_interval=config["WAIT_RECHECK_INTERVAL"],
        degraded_interval=config["WAIT_RECHECK_INTERVAL_DEGRADED"],
    )
    if config.get("REDIS_URL"):
        return RedisHub(config["REDIS_URL"], config.get("REDIS_PREFIX", ""), **limits)
    return LocalHub(**limits)


def init_app(app):
    app.extensions[service.HUB] = create_hub(app.config)
