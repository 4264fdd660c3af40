"""The line: a fair waiting room per event at sales open (API.md, "The line")."""
from . import service


def create_store(config):
    """Redis when REDIS_URL is set (one line per event for every worker and instance), else the process."""
    if config.get("REDIS_URL"):
        from .redis_store import STORE_ERRORS, RedisLineStore

        return RedisLineStore(config["REDIS_URL"], config.get("REDIS_PREFIX", "")), STORE_ERRORS
    from .local_store import STORE_ERRORS, LocalLineStore

    return LocalLineStore(), STORE_ERRORS


def init_app(app):
    from . import routes  # here: the orders' routes import this package's service, and these theirs

    store, errors = create_store(app.config)
    line = app.extensions[service.LINE] = service.Line(app, store, errors)
    app.register_blueprint(routes.bp)
    # Every worker runs the admitter loop (only the lease holder of an event admits), from its first
    # request: not at import, nor in a CLI command, nor in the master before gunicorn forks.
    app.before_request(line.admitter.start)
