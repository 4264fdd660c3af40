"""The OpenAPI 3.1 document of the JSON API, generated from the routes and their schemas."""
from . import routes


def init_app(app):
    app.register_blueprint(routes.bp)
