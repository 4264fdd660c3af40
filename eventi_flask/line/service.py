"""The line: joining it instead of being shed, and reading or waiting on a place (API.md, "The line").

A place is a ticket in its event's line (the next number of a counter) and the order's body as
POST got it.  Its position is worked out, not stored: the people ahead are the tickets between the
line's head (the lowest ticket still waiting) and its own, less those gone out of the middle (left,
or told sold out).  So a move of the line is one small message per event (admitter.py publishes it
through the notification hub), and every held wait of every worker works out its own place from it.
"""
import dataclasses
import hashlib
import json
import logging
import math
import secrets
import time
from bisect import bisect_left
from datetime import timedelta

import gevent
import gevent.event
from flask import current_app, jsonify
from sqlalchemy import select

from ..clock import as_utc, utcnow
from ..errors import ApiError
from ..events.models import Event
from ..events import service as events
from ..extensions import db
from ..notify.hub import LINE_CHANNEL_PREFIX, WaitLimitReached
from ..notify.service import get_hub
from ..orders import service as orders
from ..orders.admission import EXTENSION as ADMISSION, busy

log = logging.getLogger(__name__)

LINE = "eventi.line"
WAITING = ("queued", "admitting")  # admitting: its order is being made; the page still shows the place
# A held wait answers a place that moved at most this often: every second near the front, every
# REFRESH_MOST seconds far back, so 10,000 waiting cost a few hundred answers a second, not 10,000.
REFRESH_AHEAD_PER_SECOND = 20
REFRESH_MOST = 20.0
EVENT_CACHE_SECONDS = 5.0  # an arriving order reads its event's line settings from this worker's memory
KNOWN_PLACES_MOST = 50_000  # places a worker remembers between a page's waits (a few hundred bytes each)
ADMITTING_READ_SECONDS = 5.0  # a place whose order is being made is read again this often without a tick's word
DEGRADED_READ_SECONDS = 3.0  # while the hub has lost Redis, a held place is read this often


def get_line():
    return current_app.extensions[LINE]


class EventLine:
    """The settings of one event's line, as [event.line] and the sales window give them."""

    __slots__ = ("slug", "enabled", "max_rate", "pre_queue", "sales_start", "sales_close", "types")

    def __init__(self, event):
        self.slug = event.slug
        self.enabled = event.line_enabled
        self.max_rate = event.line_max_rate
        self.pre_queue = timedelta(minutes=event.line_pre_queue_minutes)
        self.sales_start = as_utc(event.sales_start) if event.sales_start else None
        self.sales_close = as_utc(event.sales_close)
        self.types = {tt.code: tt.max_per_order for tt in event.ticket_types}

    def in_pre_queue(self, now):
        return self.sales_start is not None and self.sales_start - self.pre_queue <= now < self.sales_start

    def on_sale(self, now):
        return (self.sales_start is None or self.sales_start <= now) and now < self.sales_close

    def opening(self):
        """What names this sale's opening: the pre-queue is shuffled once per opening."""
        return self.sales_start.isoformat() if self.sales_start else "at once"

    def seconds_to_opening(self, now):
        return max((self.sales_start - now).total_seconds(), 0) if self.sales_start else 0


def event_line(slug):
    """The event's EventLine, or None for an unknown event; read at most every EVENT_CACHE_SECONDS, by one
    greenlet at a time.

    Every POST and every held wait of a sale asks for the same event: when its entry ran out, hundreds
    of them at once each read it on a pooled connection, the pool ran dry, and POSTs waited seconds for
    it, then 503 (a sale of 6,000 at 600/s).  Now the first to find it out of date reads it again while
    the others answer from the entry they have; only an event never read yet makes them wait for that read.
    """
    line = get_line()
    cached = line.events.get(slug)
    if cached is not None and (cached[0] > time.monotonic() or slug in line.reading):
        return cached[1]
    first = line.reading.get(slug)
    if first is not None:
        return first.get()
    first = line.reading[slug] = gevent.event.AsyncResult()
    try:
        event = db.session.scalar(select(Event).where(Event.slug == slug)) if events.SLUG.fullmatch(slug) else None
        settings = EventLine(event) if event is not None else None
        db.session.commit()  # the read ends here; the connection goes back
    except BaseException as exc:
        first.set_exception(exc)  # those waiting for this first read fail as it did (a 503)
        raise
    finally:
        del line.reading[slug]
    line.events[slug] = (time.monotonic() + EVENT_CACHE_SECONDS, settings)
    first.set(settings)
    return settings


def now_ms():
    return int(time.time() * 1000)


def _key_hash(key):
    return hashlib.sha256(key.encode()).hexdigest()[:32] if key is not None else None


def new_place_id(slug):
    # The event's slug (no "." in it) names the line the place is in; the rest is unguessable.
    return f"{slug}.{secrets.token_urlsafe(16)}"


def slug_of(place_id):
    slug, dot, token = place_id.partition(".")
    if not dot or not events.SLUG.fullmatch(slug) or not 16 <= len(token) <= 32:
        raise ApiError(404, "place_not_found", "No place in a line with that id.")
    return slug


def store_unavailable(exc):
    log.warning("The line's store failed: %s", exc)
    return busy()


# -- POST /api/orders: straight on, into the line, or 503 busy --

def route_order(data, key):
    """None to make the order now; else the answer to give (202 with a place, or a place's outcome).

    The order joins its event's line when this worker would shed it, when the line already has
    people in it (a later arrival must not overtake them), when buyers arrive faster than orders are
    served (more orders made at once, every worker and instance together, than the line's serving rate
    allows: at least LINE_START_RATE a second, at most max_rate), before sales_start within
    pre_queue_minutes, or always with LINE_FORCE.  503 busy only when it would be shed and there is
    no line to hold it (switched off for the event, or its store failing).
    """
    admission = current_app.extensions.get(ADMISSION)
    shed = admission is not None and not admission.admit()
    settings = event_line(data["event"])
    if settings is None or not settings.enabled or not _valid_for(settings, data):
        if shed:
            raise busy()
        return None  # the order's own path answers (404, 400, or the order)
    now = utcnow()
    pre = settings.in_pre_queue(now)
    if not pre and not settings.on_sale(now):
        return None  # 409 sales_not_open or sales_closed, at once: nothing to wait for
    line = get_line()
    force = shed or pre or current_app.config["LINE_FORCE"]
    if shed and key is not None and orders.key_used(key):
        return None  # a retry of an order made outside the line, shed this time: it answers that order (201)
    body = json.dumps(data, sort_keys=True, separators=(",", ":"))
    place_id = new_place_id(settings.slug)
    place = {"id": place_id, "body": body, "body_hash": orders.body_hash(data),
             # the buyer's key when there is one, so that a retry outside the line finds the order too
             "order_key": key if key is not None else f"line:{place_id}",
             "type": data["ticket_type"], "quantity": data["quantity"]}
    try:
        outcome, found, view = line.store.join(settings.slug, place, _key_hash(key), now_ms(), pre, force,
                                               (line.start_rate(), settings.max_rate or 0))
    except line.store_errors as exc:
        if force:
            raise store_unavailable(exc) from None
        return None
    if outcome == "none":
        return None
    line.admitter.start()
    line.remember(found.id, found, view)  # its page's first wait, a moment from now, is placed from memory
    if outcome == "existing":
        return _answer_again(found, view, place["body_hash"], settings)
    return _queued_response(place_body(found, view, settings))


def _valid_for(settings, data):
    """Only orders the event could take wait in its line: the rest get their 404 or 400 now."""
    most = settings.types.get(data["ticket_type"])
    return most is not None and data["quantity"] <= most


def _queued_response(answer, replayed=False):
    response = jsonify({"status": "queued", "queue": {name: answer[name] for name in
                                                      ("id", "position", "ahead", "estimated_wait_s", "version")}})
    response.status_code = 202
    response.headers["Location"] = f"/api/queue/{answer['id']}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _answer_again(place, view, body_hash, settings):
    """The same Idempotency-Key again: its place as now, or the order once made, or its refusal."""
    if place.body_hash != body_hash:
        raise ApiError(422, "idempotency_key_reused",
                       "This Idempotency-Key was already used for a different order; use a new key for a new order.",
                       {"Idempotency-Key": "Already used with another body."})
    if place.status == "admitted":
        response = jsonify(orders.order_by_id(place.order["id"]))
        response.status_code = 201
        response.headers["Location"] = f"/api/orders/{place.order['id']}"
        response.headers["Idempotent-Replayed"] = "true"
        return response
    if place.status in WAITING:
        return _queued_response(place_body(place, view, settings), replayed=True)
    raise refusal(place.error)


def refusal(error):
    return ApiError(error["http_status"], error["code"], error["message"], error.get("fields"))


# -- a place as the API shows it --

def place_body(place, view, settings):
    """API.md's place: {id, status, position, ahead, estimated_wait_s, version, order, error}."""
    if place.status in WAITING:
        if place.status == "admitting":
            ahead = 0
        else:
            ahead = max(place.ticket - view["head"] - view["gone_ahead"], 0)
        return {"id": place.id, "status": "queued", "position": ahead + 1, "ahead": ahead,
                "estimated_wait_s": estimated_wait(ahead, view, settings), "version": 2 * view["tick"],
                "order": None, "error": None}
    error = None
    if place.error is not None:
        error = {"code": place.error["code"], "message": place.error["message"], "fields": place.error.get("fields") or {}}
    return {"id": place.id, "status": place.status, "position": 0, "ahead": 0, "estimated_wait_s": 0,
            "version": place.version, "order": place.order, "error": error}


def estimated_wait(ahead, view, settings):
    """Seconds until the turn of a place with `ahead` people before it: those who will still be
    there (some leave: the measured share) over the measured serving rate, plus the time to sales_start."""
    rate = view["rate"] or settings.max_rate or get_line().start_rate()
    if settings.max_rate:
        rate = min(rate, settings.max_rate)
    staying = ahead * (1 - min(view["share"], 0.9))
    return int(math.ceil(staying / rate + settings.seconds_to_opening(utcnow())))


def _read(place_id, known_will_do=False):
    """(slug, settings, (Place, view)) from the store; with `known_will_do`, from this worker's memory when
    the place is known here as queued and its line's last tick, a moment old, says it still is."""
    slug = slug_of(place_id)
    settings = event_line(slug)
    line = get_line()
    if known_will_do and settings is not None:
        known = line.known_place(slug, place_id)
        if known is not None:
            return slug, settings, known
    try:
        view = line.store.view(slug, place_id, now_ms())
    except line.store_errors as exc:
        raise store_unavailable(exc) from None
    if view is None or settings is None:
        raise ApiError(404, "place_not_found", "No place in a line with that id.")
    line.remember(place_id, *view)
    return slug, settings, view


def place_by_id(place_id):
    """GET /api/queue/<id>: the place as it is now; its page has asked (it keeps its place)."""
    _, settings, (place, view) = _read(place_id)
    return place_body(place, view, settings)


def refresh_after(ahead):
    return min(max(ahead / REFRESH_AHEAD_PER_SECOND, 1.0), REFRESH_MOST)


def tick_channel(slug):
    """The hub's name for an event's line: one channel for every waiter of that line."""
    return f"{LINE_CHANNEL_PREFIX}{slug}"


def changed(view, tick, place):
    """True when `tick` (the admitter's message) changed the place itself: its turn came, it left or was
    told sold out, or the pre-queue was shuffled; for a place whose order is being made, when it was made
    (or refused)."""
    if tick["epoch"] != view["epoch"]:
        return True
    if place.status == "admitting":
        # Its turn is behind the head from now on: asking the store each tick until its order was made cost
        # two or three reads a buyer (a third of the line's waits' CPU at a sale of 6,000).
        return _holds(tick.get("done", ()), place.ticket)
    return place.ticket < tick["head"] or _holds(tick["gone"], place.ticket)


def _gone_ahead(tick, place):
    """Tickets gone out of the middle between `tick`'s head and the place."""
    return bisect_left(tick["gone"], place.ticket) - bisect_left(tick["gone"], tick["head"])


def ahead_at(tick, place):
    """The people ahead of an unchanged place as of `tick`."""
    return max(place.ticket - tick["head"] - _gone_ahead(tick, place), 0)


def moved(view, tick, place):
    """The view as of `tick`, or None when the place itself changed (changed()): read it again."""
    if changed(view, tick, place):
        return None
    return {**view, "head": tick["head"], "gone_ahead": _gone_ahead(tick, place), "tick": tick["tick"], "rate": tick["rate"],
            "share": tick["share"], "length": tick["length"]}


def _holds(sorted_tickets, ticket):
    i = bisect_left(sorted_tickets, ticket)
    return i < len(sorted_tickets) and sorted_tickets[i] == ticket


def wait_for_place(place_id, timeout, since, client=None):
    """GET /api/queue/<id>/wait: the long poll.  Without `since`, at once.  Otherwise held until the
    place is served, refused or left, or it moved and has been held refresh_after(ahead) seconds, or
    `timeout` runs out.  Holds no database connection; wakes on the line's one message per tick."""
    # A page asks again as soon as it is answered: that wait's place is known here, and the line's tick of a
    # moment ago places it without a store read (a third of a held wait's CPU at a sale of 6,000).
    slug, settings, (place, view) = _read(place_id, known_will_do=since is not None)
    answer = place_body(place, view, settings)
    if since is None or answer["status"] != "queued":
        return answer
    position = answer["position"]  # a move answers; a turn begun (its order being made) does not, until made
    hub = get_hub()
    if hub.shutting_down:
        raise orders._shutting_down()
    started = time.monotonic()
    deadline = started + timeout
    try:
        waiter = hub.watch(tick_channel(slug), client, shared=True)
    except WaitLimitReached:
        raise ApiError(503, "server_busy", "This server is holding as many waits as it can.", headers={"Retry-After": "2"})
    line = get_line()
    line.holding(slug, place_id, +1)
    read_at = started

    def overdue():
        # Its order is being made, and no tick has said it was made for a while (a tick message lost): read it.
        return place.status == "admitting" and time.monotonic() - read_at >= ADMITTING_READ_SECONDS

    def wants(message):
        # Asked by the hub's loop for each tick, before waking this wait's greenlet: at a sale of 6,000 every
        # waiter woke every second to find it had nothing to answer yet, a loop turn of 100-300 ms during
        # which every POST waited.  Now only a tick that ends the wait, or answers a move, wakes it.
        tick = message.get("order")
        if tick is None or tick["tick"] <= view["tick"]:
            return False
        line.saw_tick(slug, tick)
        if changed(view, tick, place) or overdue():
            return True  # its turn came or ended, it left, or the line was shuffled: read it again
        ahead = ahead_at(tick, place)
        return ahead + 1 != position and time.monotonic() - started >= refresh_after(ahead)

    waiter.wants = wants
    try:
        while not hub.shutting_down:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # While the hub has lost Redis no tick arrives: read the place itself every few seconds.
            degraded = hub.connected is False
            message, _ = waiter.wait(min(remaining, DEGRADED_READ_SECONDS) if degraded else remaining)
            if waiter.client_left:
                break
            tick = message["order"] if message is not None else None
            if tick is None and degraded:
                try:
                    place, view = _read(place_id)[2]
                except ApiError:
                    continue  # the store is away too: hold on, the page asks again at the timeout
                fresh = view
            elif tick is None or tick["tick"] <= view["tick"]:
                continue
            else:  # wants() let it through, and told the line of the tick
                fresh = None if overdue() else moved(view, tick, place)
            if fresh is None:
                place, view = _read(place_id)[2]
                read_at = time.monotonic()
            else:
                view = fresh
            answer = place_body(place, view, settings)
            if answer["status"] != "queued":
                return answer
            if (answer["position"] != position and answer["version"] > since
                    and time.monotonic() - started >= refresh_after(answer["ahead"])):
                return answer
        if hub.shutting_down:
            raise orders._shutting_down()
        # The ticks it slept through (wants() said nothing to answer) still move the place it answers.
        return place_body(*(line.known_place(slug, place_id) or (place, view)), settings)
    finally:
        line.holding(slug, place_id, -1)
        hub.unwatch(waiter)


def event_summary(slug):
    """GET /api/events/<slug>'s "line": {length, serving_rate, estimated_wait_s}; None when unknown."""
    settings = event_line(slug)
    line = get_line()
    try:
        summary = line.store.summary(slug)
    except line.store_errors as exc:
        log.warning("The line's store failed: %s", exc)
        return None
    return {"length": summary["length"], "serving_rate": round(summary["rate"], 1),
            "estimated_wait_s": estimated_wait(summary["length"], summary, settings) if summary["length"] else 0}


class Line:
    """One per app: the store, the admitter, and the places whose waits this worker holds."""

    def __init__(self, app, store, store_errors):
        from .admitter import Admitter

        self.store = store
        self.store_errors = store_errors
        self.events = {}  # slug -> (until, EventLine)
        self.reading = {}  # slug -> AsyncResult of the read under way (event_line)
        self.places = {}  # place id -> (Place, view) as last read here, for the queued places (known_place)
        self.ticks = {}  # slug -> (monotonic seconds, the line's last tick seen here)
        self.tick_seconds = app.config["LINE_TICK"]
        self.patience = app.config["LINE_PATIENCE"]
        self.configured_start_rate = app.config["LINE_START_RATE"]
        self._start_rate = (0.0, self.configured_start_rate)  # (until, rate): start_rate()
        self._held = {}  # slug -> {place id: held waits}
        self._toucher = None
        self.admitter = Admitter(app, self)

    def start_rate(self):
        """Where a line starts before it has measured anything: the rate the service's last line averaged (the
        store keeps it), else LINE_START_RATE; read from the store at most every EVENT_CACHE_SECONDS."""
        until, rate = self._start_rate
        if until < time.monotonic():
            try:
                learned = self.store.learned_rate()
            except self.store_errors:
                learned = None  # the store's failure shows where it matters (a join); this is an estimate
            # LINE_START_RATE stays a floor: the learned rate raises the start, never lowers what was set.
            rate = max(learned or 0.0, self.configured_start_rate)
            self._start_rate = (time.monotonic() + EVENT_CACHE_SECONDS, rate)
        return rate

    def remember(self, place_id, place, view):
        if place.status == "queued":
            if len(self.places) >= KNOWN_PLACES_MOST:
                del self.places[next(iter(self.places))]  # the longest known
            # Without the order's body and key (a wait never needs them): ~1 KB less a place.
            self.places[place_id] = (dataclasses.replace(place, body="", body_hash="", order_key=""), view)
        else:
            self.places.pop(place_id, None)

    def saw_tick(self, slug, tick):
        # Told by every wait the tick reaches (wants()): kept once per tick, not once per wait.
        seen = self.ticks.get(slug)
        if seen is None or seen[1] is not tick:
            self.ticks[slug] = (time.monotonic(), tick)

    def known_place(self, slug, place_id):
        """(Place, view) of a place known here as queued, moved by the line's last tick when that tick came
        within two ticks; None when it may have changed (its turn came, it left, the pre-queue was shuffled)."""
        known, seen = self.places.get(place_id), self.ticks.get(slug)
        if known is None or seen is None or time.monotonic() - seen[0] > 2 * self.tick_seconds:
            return None
        place, view = known
        fresh = moved(view, seen[1], place) if seen[1]["tick"] > view["tick"] else view
        return (place, fresh) if fresh is not None else None

    def holding(self, slug, place_id, change):
        """A wait on the place begins (+1) or ends (-1): while held, its page counts as asking."""
        held = self._held.setdefault(slug, {})
        held[place_id] = held.get(place_id, 0) + change
        if held[place_id] <= 0:
            del held[place_id]
        if self._toucher is None:
            self._toucher = gevent.spawn(self._touch_forever)

    def _touch_forever(self):
        # One write per event every quarter of LINE_PATIENCE, for every place held here.
        while True:
            gevent.sleep(self.patience / 4)
            for slug, held in list(self._held.items()):
                try:
                    self.store.touch(slug, list(held), now_ms())
                except self.store_errors as exc:
                    log.warning("Could not mark the held places of %s's line as asked for: %s", slug, exc)

    def stop(self):
        self.admitter.stop()
        if self._toucher is not None:
            self._toucher.kill(block=False)

