"""The customer's pages: checkout, payment status, and the ticket link."""


def init_app(app):
    # Imported here, not at the top: orders.schemas imports this package's ticket_links, and the
    # pages' routes import orders.
    from . import routes

    app.register_blueprint(routes.bp)
