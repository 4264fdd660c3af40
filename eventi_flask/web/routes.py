"""Server-rendered pages: the checkout form, the payment-status page, and the ticket link's page.

The views only look things up and render; the work happens in the JSON API,
which the page's one script (static/eventi.js) calls.
"""
from flask import Blueprint, current_app, render_template, request

from ..clock import east_africa_time, utcnow
from ..errors import ApiError
from ..events.service import event_by_slug
from ..line.service import event_line
from ..orders import service
from . import presenters, ticket_links

# /static belongs to the app's own static route; ours must not sit under it.
bp = Blueprint("web", __name__, template_folder="templates", static_folder="static", static_url_path="/assets")


@bp.app_template_filter("kes")
def kes_filter(amount):
    return presenters.kes(amount)


@bp.app_template_filter("qr_code")
def qr_code_filter(text):
    return presenters.ticket_qr_code(text)


@bp.app_template_filter("eat")
def east_africa_time_filter(iso):
    return east_africa_time(iso)


def pre_queue_of(slug):
    """How long before sales open the event's line takes arrivals ([event.line] pre_queue_minutes); None without a line."""
    settings = event_line(slug)
    return settings.pre_queue if settings is not None and settings.enabled else None


@bp.get("/events/<slug>/checkout")
def checkout(slug):
    now = utcnow()
    event = event_by_slug(slug, now)
    # "Try again" comes back with the ticket choice in the query string; the
    # personal details come back from the browser's sessionStorage instead.
    choice = presenters.checkout_choice(event, request.args.get("ticket_type"), request.args.get("quantity", type=int))
    return render_template(
        "checkout.html",
        event=event,
        choice=choice,
        sales=presenters.sales_window(event, now, pre_queue_of(slug)),
        pre_queue_sentence=presenters.PRE_QUEUE_SENTENCE,
        line_hold_seconds=presenters.line_hold_seconds(current_app.config),
        phone_pattern=presenters.PHONE_PATTERN,
        phone_separators=presenters.PHONE_SEPARATORS,
        phone_message=presenters.PHONE_MESSAGE,
        sandbox_phones=presenters.sandbox_phones() if current_app.config["PAYHERO_MODE"] == "sandbox" else None,
        sandbox_delay=current_app.config["SANDBOX_CALLBACK_DELAY"],
        retry_advice=presenters.retry_advice(request.args.get("after", type=int)),
    )


def _order_page(template, order, **context):
    event = event_by_slug(order["event"])
    ticket_names = {ticket["id"]: ticket["name"] for ticket in event["ticket_types"]}
    return render_template(
        template,
        order=order,
        event=event,
        ticket_name=ticket_names.get(order["ticket_type"], order["ticket_type"]),
        reason=presenters.failure_reason(order),
        state=presenters.page_state(order),
        delivery=presenters.ticket_delivery(current_app.config),
        **context,
    )


@bp.get("/orders/<order_id>")
def order_status(order_id):
    order = service.order_by_id(order_id)
    return _order_page(
        "order.html",
        order,
        try_again_query=presenters.try_again_query(order),
        reasons=presenters.reasons_for_browser(),
        hold_seconds=current_app.config["WAIT_TIMEOUT_DEFAULT"],
    )


@bp.get("/t/<path:token>")  # any path: every wrong link gets the same page
def tickets(token):
    """The ticket link: a forged or altered token is the same 404 as an unknown order, and says nothing more."""
    order_id = ticket_links.order_id_from_token(token)
    if order_id is None:
        raise service.order_not_found()
    return _order_page("tickets.html", service.order_by_id(order_id))


@bp.errorhandler(ApiError)
def page_error(exc):
    """An unknown event or order gets a page a person can use, not the API's JSON."""
    return render_template("error.html", status=exc.status, message=exc.message), exc.status


@bp.after_request
def status_page_is_never_cached(response):
    # The page shows the order as it is now; a cached copy would show an old state.
    # (CSP and the other security headers come from eventi_flask.security, for every response.)
    if request.endpoint == "web.order_status":
        response.headers["Cache-Control"] = "no-store"
    elif request.endpoint == "web.tickets":
        # Whoever has the link has the tickets: no shared cache keeps a copy, no search engine lists it
        # (Referrer-Policy: no-referrer, on every response, keeps it from other sites).
        response.headers["Cache-Control"] = "private, no-store"
        response.headers["X-Robots-Tag"] = "noindex"
    return response
