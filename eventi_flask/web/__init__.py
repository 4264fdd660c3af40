"""The customer's pages: checkout and payment status."""
from . import routes


def init_app(app):
    app.register_blueprint(routes.bp)
