"""Waking held requests when an order changes: the hubs and the after-commit publisher."""
from . import service
from .hub import create_hub


def init_app(app):
    app.extensions[service.HUB] = create_hub(app.config)
