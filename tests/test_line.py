"""The line (issue 23): a fair waiting room instead of 503 busy, served in join order, once each."""
import math
import time
import tomllib
import uuid

import gevent
import gevent.pool
import psycopg
import pytest
import requests
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

import config
from eventi_flask import create_app
from eventi_flask.events import service as events
from eventi_flask.events.models import Event, TicketType
from eventi_flask.extensions import db
from eventi_flask.line import service as line_service
from eventi_flask.line.service import LINE, tick_channel
from eventi_flask.orders.models import Order
from tests.conftest import shut_down
from tests.support import DEMO, event_file, free_port, toml, wait_until, when

pytestmark = pytest.mark.env(LINE_TICK="0.1")


def join(client, body=DEMO, key=None):
    return client.post("/api/orders", json=body, headers={"Idempotency-Key": key or str(uuid.uuid4())})


def place(client, place_id):
    response = client.get(f"/api/queue/{place_id}")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def store_reads(app, monkeypatch):
    """The place's status at each read of a place from the line's store, as the test goes on."""
    store, reads = app.extensions[LINE].store, []
    view = store.view

    def counted_view(slug, place_id, *args, **kw):
        found = view(slug, place_id, *args, **kw)
        reads.append(found[0].status if found else None)
        return found

    monkeypatch.setattr(store, "view", counted_view)
    return reads


def served(client, place_id):
    """The place once it is no longer waiting (asking keeps it in the line meanwhile)."""
    return wait_until(lambda: (lambda p: p if p["status"] != "queued" else None)(place(client, place_id)),
                      timeout=20, message=f"place {place_id} served")


def order_rows(app):
    with app.app_context():
        rows = db.session.execute(select(Order.id, Order.created_at).order_by(Order.created_at)).all()
        db.session.remove()
    return rows


def import_event(app, data):
    with app.app_context():
        events.import_event(tomllib.loads(toml(data)))
        db.session.remove()


def set_event(app, slug="test-this-end-to-end", **values):
    with app.app_context():
        db.session.execute(update(Event).where(Event.slug == slug).values(**values))
        db.session.commit()
    app.extensions[LINE].events.clear()  # the settings cache of this worker


@pytest.mark.env(LINE_FORCE="1", LINE_TICK="1")  # all join before the first move
def test_places_are_served_in_the_order_they_were_taken(app, client, wire):
    answers = [join(client, {**DEMO, "name": f"Buyer {i}"}) for i in range(6)]

    assert {a.status_code for a in answers} == {202}
    queued = [a.get_json()["queue"] for a in answers]
    assert [q["position"] for q in queued] == [1, 2, 3, 4, 5, 6]
    assert [q["ahead"] for q in queued] == [0, 1, 2, 3, 4, 5]
    assert all(a.headers["Location"] == f"/api/queue/{q['id']}" for a, q in zip(answers, queued))
    outcomes = [served(client, q["id"]) for q in queued]
    assert {o["status"] for o in outcomes} == {"admitted"}
    made_in_order = [order_id for order_id, _ in order_rows(app)]
    assert [o["order"]["id"] for o in outcomes] == made_in_order
    assert all(o["order"]["status"] == "pending" and o["error"] is None for o in outcomes)


@pytest.mark.env(LINE_FORCE="1")
def test_the_same_key_keeps_the_same_place_and_then_answers_its_order(app, client, wire):
    key = str(uuid.uuid4())
    first = join(client, key=key)
    again = join(client, key=key)
    other_body = join(client, {**DEMO, "quantity": 2}, key=key)

    assert first.status_code == again.status_code == 202
    assert again.get_json()["queue"]["id"] == first.get_json()["queue"]["id"]
    assert other_body.status_code == 422 and other_body.get_json()["error"]["code"] == "idempotency_key_reused"
    outcome = served(client, first.get_json()["queue"]["id"])
    after = join(client, key=key)
    assert after.status_code == 201 and after.get_json()["id"] == outcome["order"]["id"]
    assert len(order_rows(app)) == 1


def test_an_unknown_place_is_404(client):
    for place_id in ("nope", "test-this-end-to-end.AAAAAAAAAAAAAAAAAAAAAA"):
        response = client.get(f"/api/queue/{place_id}/wait?since=0&timeout=1")
        assert response.status_code == 404 and response.get_json()["error"]["code"] == "place_not_found"


@pytest.mark.env(ORDER_SHED_LAG="0,0")  # admission says "full" to every order: the line forms
def test_past_capacity_an_order_joins_the_line_instead_of_503(app, client, wire):
    answer = join(client)

    assert answer.status_code == 202 and answer.get_json()["status"] == "queued"
    assert order_rows(app) == []  # nothing reserved yet
    assert served(client, answer.get_json()["queue"]["id"])["status"] == "admitted"


def test_buyers_arriving_faster_than_orders_are_served_form_a_line_in_order(app, client, wire, monkeypatch):
    # No worker is shedding, but four buyers arrive within one window of the line's serving rate (max_rate 4
    # a second: one order made at once a quarter second): the first is served at once, the rest join behind
    # it, every worker and instance counting together (API.md: "formed only when buyers arrive faster than
    # its orders are served"), rather than each worker making as many as it can until its loop falls behind.
    set_event(app, line_max_rate=4)
    frozen = line_service.now_ms()
    monkeypatch.setattr(line_service, "now_ms", lambda: frozen)  # all four arrive in one window
    answers = [join(client) for _ in range(4)]

    assert [a.status_code for a in answers] == [201, 202, 202, 202]
    assert [a.get_json()["queue"]["position"] for a in answers[1:]] == [1, 2, 3]
    monkeypatch.undo()
    outcomes = [served(client, a.get_json()["queue"]["id"]) for a in answers[1:]]
    assert [o["status"] for o in outcomes] == ["admitted"] * 3
    made = [row.id for row in order_rows(app)]
    assert made == [answers[0].get_json()["id"], *(o["order"]["id"] for o in outcomes)]  # in the order they came


@pytest.mark.env(ORDER_SHED_LAG="0,0")
def test_with_the_line_off_past_capacity_is_503_busy(app, client, wire):
    set_event(app, line_enabled=False)

    answer = join(client)

    assert answer.status_code == 503 and answer.get_json()["error"]["code"] == "busy"


@pytest.mark.env(LINE_FORCE="1")
def test_sold_out_tells_the_whole_line_at_once(app, client, wire):
    with app.app_context():
        db.session.execute(update(TicketType).where(TicketType.code == "early-bird")
                           .values(capacity=TicketType.reserved + 1))
        db.session.commit()
    queued = [join(client).get_json()["queue"]["id"] for _ in range(5)]

    outcomes = [served(client, place_id) for place_id in queued]

    assert outcomes[0]["status"] == "admitted"
    assert [o["status"] for o in outcomes[1:]] == ["sold_out"] * 4
    assert {o["error"]["code"] for o in outcomes[1:]} == {"sold_out"}
    assert len(order_rows(app)) == 1


@pytest.mark.env(LINE_PATIENCE="1")
def test_a_place_whose_page_stopped_asking_is_left_and_the_line_goes_on(app, client, wire):
    import_event(app, event_file(sales_start=when(seconds=3)))  # a pre-queue: everyone waits for the opening
    body = {**DEMO, "event": "sauti-live", "ticket_type": "regular"}
    staying = [join(client, body).get_json()["queue"]["id"] for _ in range(3)]
    gone = join(client, body).get_json()["queue"]["id"]

    outcomes = {}
    while len(outcomes) < len(staying):  # these pages keep asking, as the page does
        for place_id in staying:
            current = place(client, place_id)
            if current["status"] != "queued":
                outcomes[place_id] = current
        gevent.sleep(0.2)

    assert {o["status"] for o in outcomes.values()} == {"admitted"}
    assert place(client, gone)["status"] == "left"


@pytest.mark.env(LINE_START_RATE="4", LINE_TICK="1")  # about four a second: the late arrivals find early ones in line
def test_the_pre_queue_is_shuffled_at_opening_and_later_arrivals_join_behind(app, client, wire):
    import_event(app, event_file(sales_start=when(seconds=3)))
    body = {**DEMO, "event": "sauti-live", "ticket_type": "regular", "quantity": 1}
    early = [join(client, body).get_json()["queue"]["id"] for _ in range(12)]
    assert [place(client, p)["position"] for p in early] == list(range(1, 13))
    assert all(place(client, p)["estimated_wait_s"] >= 1 for p in early)  # the opening is still ahead

    wait_until(lambda: any(place(client, p)["status"] != "queued" for p in early), timeout=10, message="opening")
    late = [join(client, body).get_json()["queue"]["id"] for _ in range(3)]
    order_of = {p: served(client, p)["order"]["id"] for p in early + late}

    made = [order_id for order_id, _ in order_rows(app)]
    early_made = [made.index(order_of[p]) for p in early]
    assert sorted(early_made) == list(range(12))  # every early one before any later arrival
    assert early_made != list(range(12))  # in a random order (the chance of join order is 1 in 12!)
    assert [made.index(order_of[p]) for p in late] == [12, 13, 14]


@pytest.mark.env(LINE_FORCE="1")
def test_a_place_whose_order_meets_a_database_failure_keeps_its_turn_and_is_made_once(app, client, wire, monkeypatch):
    """The database answers 503 to the first attempts at the order: the buyer stays first and is admitted
    once it answers again, with one order, not left waiting for ever."""
    from eventi_flask.errors import database_unavailable
    from eventi_flask.line import admitter

    create_order, attempts = admitter.orders.create_order, []

    def failing_twice(*args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:  # as the order's own path says it
            raise database_unavailable("The database is not answering; please try again.")
        if len(attempts) == 2:  # as a query in it meets it
            raise OperationalError("SELECT ...", {}, Exception("terminating connection due to administrator command"))
        return create_order(*args, **kwargs)

    monkeypatch.setattr(admitter.orders, "create_order", failing_twice)
    first = join(client).get_json()["queue"]
    admitted = served(client, first["id"])
    assert admitted["status"] == "admitted" and len(attempts) == 3
    assert [order_id for order_id, _ in order_rows(app)] == [admitted["order"]["id"]]


def test_the_lines_tick_is_no_event_in_the_log(app, client, hub, log_lines):
    """API.md's log lines are one per event: a line moving every tick is not "Redis notification sent"."""
    import_event(app, event_file(sales_start=when(seconds=60)))  # the pre-queue: people wait, nothing is made
    body = {**DEMO, "event": "sauti-live", "ticket_type": "regular", "quantity": 1}
    assert join(client, body).status_code == 202
    wait_until(lambda: (hub.latest(tick_channel("sauti-live")) or {}).get("version", 0) >= 10, timeout=10,
               message="ten ticks of the line")
    assert "Redis notification sent" not in log_lines


@pytest.mark.env(LINE_FORCE="1", LINE_START_RATE="1", LINE_TICK="1")
def test_the_wait_answers_when_the_place_moves_and_when_it_is_admitted(app, client, wire):
    set_event(app, line_max_rate=1)  # one admission a second: the second place moves once
    first, second = (join(client).get_json()["queue"] for _ in range(2))

    moved = client.get(f"/api/queue/{second['id']}/wait?since={second['version']}&timeout=10").get_json()
    assert moved["status"] == "queued" and moved["position"] == 1 and moved["version"] > second["version"]
    admitted = client.get(f"/api/queue/{second['id']}/wait?since={moved['version']}&timeout=10").get_json()
    assert admitted["status"] == "admitted" and admitted["order"]["event"] == "test-this-end-to-end"
    assert admitted["version"] > moved["version"]


@pytest.mark.env(LINE_FORCE="1", LINE_START_RATE="1", LINE_TICK="0.5")
def test_a_page_asking_again_at_once_is_placed_from_memory_until_its_turn(app, client, wire, monkeypatch):
    set_event(app, line_max_rate=1)  # one admission a second: the last place moves once a second, then is admitted
    places = [join(client).get_json()["queue"] for _ in range(6)]
    reads = store_reads(app, monkeypatch)

    last, seen = places[-1], []
    answer = client.get(f"/api/queue/{last['id']}/wait?since={last['version']}&timeout=10").get_json()
    while answer["status"] == "queued":
        seen.append(answer["position"])
        answer = client.get(f"/api/queue/{last['id']}/wait?since={answer['version']}&timeout=10").get_json()
    assert answer["status"] == "admitted" and answer["order"]["event"] == "test-this-end-to-end"
    assert seen == sorted(seen, reverse=True) and seen[-1] == 1, seen  # it only moved forward, to the front
    # Its first wait read it, and the new line's first tick (which numbers its epoch); the waits between were
    # placed by the ticks alone (read at each wait, it would be one read per answer).  Its turn is read until
    # its order is made: as often as a slow machine takes.
    assert len(seen) >= 4 and reads.count("queued") <= 2, (reads, seen)


@pytest.mark.env(LINE_FORCE="1", LINE_TICK="0.2")
def test_a_wait_whose_order_is_being_made_is_told_by_the_tick_after_it_is_made(app, client, wire, monkeypatch):
    """Its order takes a second and a half to make (PayHero slow to take the push): its wait reads the
    place once when its turn comes, and once when a tick says the order was made; not at each tick between."""
    from eventi_flask.line import admitter

    create_order, made_at = admitter.orders.create_order, []

    def slow_push(*args, **kwargs):
        gevent.sleep(1.5)
        try:
            return create_order(*args, **kwargs)
        finally:
            made_at.append(time.monotonic())

    monkeypatch.setattr(admitter.orders, "create_order", slow_push)
    reads = store_reads(app, monkeypatch)
    first = join(client).get_json()["queue"]
    answer = client.get(f"/api/queue/{first['id']}/wait?since={first['version']}&timeout=10").get_json()
    answered_at = time.monotonic()
    assert answer["status"] == "admitted" and answer["order"]["event"] == "test-this-end-to-end"
    assert reads.count("admitting") <= 1, reads  # ~7 ticks while its order was made: each read it before
    assert answered_at - made_at[0] < 1.0  # the tick after it was made said so (ticks of 0.2 s)


@pytest.mark.env(LINE_FORCE="1", LINE_START_RATE="5", LINE_TICK="0.1")
def test_a_place_far_back_sleeps_through_the_ticks_and_answers_its_latest_place(app, client, wire, monkeypatch):
    set_event(app, line_max_rate=5)  # five a second: the last of 80 moves every other tick, yet answers after 4 s
    places = [join(client).get_json()["queue"] for _ in range(80)]
    last = places[-1]
    from eventi_flask.notify.hub import Waiter

    wakes = []
    wait = Waiter.wait
    monkeypatch.setattr(Waiter, "wait", lambda self, timeout: wakes.append(timeout) or wait(self, timeout))

    answer = client.get(f"/api/queue/{last['id']}/wait?since={last['version']}&timeout=2").get_json()
    # Held through ~20 ticks that each moved the line: woken by none of them (its refresh is 4 s away), it
    # answers at its timeout with where the line has got to, not where it stood when the wait began.
    assert answer["status"] == "queued" and answer["version"] > last["version"]
    now = place(client, last["id"])["position"]
    assert answer["position"] < last["position"] and abs(answer["position"] - now) <= 2, (last, answer, now)
    assert len(wakes) <= 2, wakes


def test_the_event_shows_its_line(client):
    line = client.get("/api/events/test-this-end-to-end").get_json()["line"]
    assert line == {"length": 0, "serving_rate": 0.0, "estimated_wait_s": 0}


@pytest.mark.parametrize("backend", ["postgres-redis"])
@pytest.mark.env(LINE_FORCE="1")
def test_a_line_in_redis_is_shared_by_instances_and_survives_a_restart(app, client, wire, settings):
    set_event(app, line_max_rate=1)
    other = create_app(config.TestConfig(settings))  # another instance, same Redis and prefix
    restarted = None
    try:
        queued = [join(client).get_json()["queue"] for _ in range(3)]
        seen_elsewhere = other.test_client().get(f"/api/queue/{queued[2]['id']}").get_json()
        assert seen_elsewhere["id"] == queued[2]["id"] and seen_elsewhere["status"] in ("queued", "admitted")
        app.extensions[LINE].stop()  # this instance "restarts": its admitter stops mid-line
        restarted = create_app(config.TestConfig(settings))
        outcomes = [served(restarted.test_client(), q["id"]) for q in queued]
        assert [o["status"] for o in outcomes] == ["admitted"] * 3
        assert len({o["order"]["id"] for o in outcomes}) == 3 == len(order_rows(app))
    finally:
        for instance in (other, restarted):
            if instance is not None:
                shut_down(instance)


@pytest.mark.live
def test_two_gunicorn_workers_admit_every_buyer_of_a_forced_line_exactly_once(live_server_factory):
    server = live_server_factory(WEB_CONCURRENCY="2", LINE_FORCE="1", LOG_LEVEL="warning", SANDBOX_CALLBACK_DELAY="0.2")
    buyers = 40

    def buy(i):
        key = str(uuid.uuid4())
        answer = requests.post(server.url + "/api/orders", json={**DEMO, "name": f"Buyer {i}"},
                               headers={"Idempotency-Key": key}, timeout=30)
        assert answer.status_code == 202, answer.text
        current = answer.json()["queue"]
        version = current["version"]
        while True:
            current = requests.get(f"{server.url}/api/queue/{current['id']}/wait",
                                   params={"since": version, "timeout": 10}, timeout=30).json()
            if current["status"] != "queued":
                return current
            version = current["version"]

    outcomes = gevent.pool.Pool(buyers).map(buy, range(buyers))

    assert {o["status"] for o in outcomes} == {"admitted"}
    assert len({o["order"]["id"] for o in outcomes}) == buyers
    with psycopg.connect(server.env["DATABASE_URL"]) as conn:
        [(orders, reserved)] = conn.execute(
            "SELECT count(*), (SELECT reserved FROM ticket_types WHERE code = 'early-bird') FROM orders")
    assert (orders, reserved) == (buyers, buyers)


def run_cli(app, *args):
    result = app.test_cli_runner().invoke(args=list(args))
    return result.exit_code, result.output.splitlines()


def test_the_event_file_sets_the_line_and_events_show_tells_it(app, tmp_path):
    path = tmp_path / "event.toml"
    path.write_text(toml(event_file()) + "\n[event.line]\nenabled = false\nmax_rate = 40\npre_queue_minutes = 5\n")
    assert run_cli(app, "events", "import", str(path))[0] == 0
    assert "nothing changed" in run_cli(app, "events", "import", str(path))[1][0]
    code, lines = run_cli(app, "events", "show", "sauti-live")
    assert code == 0 and lines[-1] == "line: off (past capacity, orders are answered 503 busy)"

    path.write_text(toml(event_file()) + "\n[event.line]\nmax_rate = 40\n")
    code, lines = run_cli(app, "events", "import", str(path))
    assert code == 0 and "line_enabled" in lines[0] and "line_pre_queue_minutes" in lines[0]
    code, lines = run_cli(app, "events", "show", "sauti-live")
    assert lines[-1] == "line: 0 waiting, serving 0/s, about 0 s to the last (pre-queue 15 min before sales open, at most 40/s)"


@pytest.mark.parametrize("line, problem", [
    ("max_rate = 0", "event.line.max_rate: Must be 1 or more orders a second."),
    ('enabled = "yes"', "event.line.enabled: Not a valid boolean."),
    ("pre_queue_minutes = -1", "event.line.pre_queue_minutes: Must be 0 to 1440 minutes."),
    ("rate = 5", "event.line.rate: Unknown field."),
])
def test_a_bad_line_section_is_refused_in_one_line(app, tmp_path, line, problem):
    path = tmp_path / "event.toml"
    path.write_text(toml(event_file()) + f"\n[event.line]\n{line}\n")
    code, lines = run_cli(app, "events", "import", str(path))
    assert code != 0 and len(lines) == 1 and problem in lines[0], lines


def store_place(n):
    place_id = f"test-this-end-to-end.place{n:012d}"
    return {"id": place_id, "body": "{}", "body_hash": "h", "order_key": f"line:{place_id}", "type": "GA", "quantity": 1}


@pytest.mark.parametrize("backend", ["postgres-redis"])
def test_places_a_worker_did_not_claim_in_time_go_with_the_next_claim_in_order(app):
    # The workers tick out of step: one whose tick slipped past the lead's misses a batch's share, which then
    # waited at the ready list's head.  At a line's end (no new batch) it went one place a tick: a buyer
    # admitted 7 s after the next ones joined behind it (bench line, 6,000 at 600/s).
    store, slug, now = app.extensions[LINE].store, "test-this-end-to-end", line_service.now_ms()
    joined = iter(range(100))

    def a_batch_of(count):
        for _ in range(count):
            store.join(slug, store_place(next(joined)), None, now, False, True)
        store.take(slug, count, now)

    def claim(worker):
        return [p.ticket for p in store.claim(slug, worker, now, 3000, 200)]

    a_batch_of(4)
    assert claim("other") == [1, 2, 3, 4] and claim("lead") == []  # both workers claim lately
    a_batch_of(10)
    assert claim("lead") == [5, 6, 7, 8, 9]  # its share; "other" misses this tick
    a_batch_of(4)
    assert claim("lead") == [10, 11, 12, 13, 14, 15, 16]  # what was left over, then its share of the new batch
    assert claim("other") == [17, 18]
    a_batch_of(0)
    assert claim("lead") == claim("other") == []


@pytest.mark.parametrize("backend", ["postgres-redis", "sqlite-local"])
def test_no_order_is_made_at_once_while_places_taken_from_the_line_wait_for_theirs(app):
    # The line empty but its last places not yet made: an order made at once would overtake them.
    store, slug, now = app.extensions[LINE].store, "test-this-end-to-end", line_service.now_ms()
    store.join(slug, store_place(1), None, now, False, True)
    store.take(slug, 1, now)
    assert store.join(slug, store_place(2), None, now, False, False, (1000, 0))[0] == "joined"
    store.take(slug, 1, now)
    for place in store.claim(slug, "lead", now, 3000, 200):
        store.finish(slug, place.id, "admitted", "order", {"id": "x"})
    assert store.join(slug, store_place(3), None, now, False, False, (1000, 0))[0] == "none"  # made at once


def test_the_measured_rate_falls_gently_so_an_estimate_never_jumps_up_by_a_fifth():
    from eventi_flask.line.admitter import Outflow

    outflow = Outflow(start=20, cap=None)
    ahead, shown = 3000, []
    for second in range(120):
        served = 60 if second < 30 else (15 if second < 60 else 0)  # the service slows, then stalls
        outflow.measure(served, 0, 1.0)
        ahead -= served
        shown.append(ahead / outflow.measured)
    assert outflow.measured > 0
    assert all(later <= earlier * 1.2 for earlier, later in zip(shown, shown[1:]))
    assert shown[0] == pytest.approx((3000 - 60) / (20 + (60 - 20) * 0.5))  # smoothed from the first outflow


def test_a_new_lead_and_a_forming_line_do_not_make_the_estimates_jump():
    from eventi_flask.line.admitter import Outflow

    forming = Outflow(start=40, cap=None)
    forming.measure(3, 0, 1.0)  # the first tick found the first three buyers only
    assert forming.measured >= 40 * 0.98
    taking_over = Outflow(start=40, cap=None, measured=62.5)  # the last lead published 62.5 a second
    taking_over.measure(0, 0, 1.0)  # its first tick made nobody's order yet
    assert taking_over.measured == pytest.approx(62.5 * 0.98)


@pytest.mark.env(LINE_START_RATE="40")
@pytest.mark.parametrize("backend", ["postgres-redis", "sqlite-local"])
def test_a_new_lead_goes_on_from_the_outflow_not_from_the_rate_shown(app):
    # While buyers join, the rate shown may be the one the last line averaged (130) and the outflow far below it
    # (55, the joins take the CPU): a lead taking over (its worker restarted) went on at 130 during the joins.
    line, slug = app.extensions[LINE], "test-this-end-to-end"
    now = line_service.now_ms()
    line.store.advance(slug, 130.0, 0.0, 55.0, now)
    summary = line.store.summary(slug)
    assert (summary["rate"], summary["outflow"]) == (130, 55)
    with app.app_context():
        settings = line_service.event_line(slug)
        outflow = line.admitter._new_outflow(summary, settings, now + 3000)  # its lease ran out: taken over
        assert (outflow.rate, outflow.measured) == (55, 130)  # the outflow goes on; the estimates do not jump
        # An outflow set long ago (the last sale's) or never (a worker that kept none): from LINE_START_RATE.
        assert line.admitter._new_outflow(summary, settings, now + 600_000).rate == 40
        assert line.admitter._new_outflow({**summary, "outflow_ms": 0}, settings, now).rate == 40


def quick(outflow, ticks=1, shed_share=0, answers=0.1, lag=0.0):
    for _ in range(ticks):
        outflow.latencies = [answers] * 10
        outflow.adjust(shed_share=shed_share, backlog=True, lag=lag)
    return outflow.rate


def test_the_outflow_starts_fast_until_the_service_is_crowded_then_holds_near_that():
    """Slow start: a third more a tick from LINE_START_RATE while the answers are quick (a line of 6,000
    formed at 40 a second, against a service that takes 200); crowded, the rate of two ticks before is the
    ceiling; back to nine tenths of it quickly; above it, probing a little more each quick tick."""
    from eventi_flask.line.admitter import Outflow

    outflow = Outflow(start=40, cap=None)
    rates = [quick(outflow) for _ in range(6)]
    assert rates[0] == pytest.approx(40 * 1.3 + 1)
    assert rates[-1] > 200
    two_ticks_before = rates[-3]
    slowed = quick(outflow, answers=0.6)  # p90 past 0.5 s: crowded
    assert slowed == pytest.approx(rates[-1] * 0.95) and outflow.ceiling == two_ticks_before
    # The next two ticks' answers are of places taken before the cut: no second cut for them.
    assert quick(outflow, answers=2.0) == slowed and quick(outflow, shed_share=1) == slowed
    assert quick(outflow, answers=2.0) == pytest.approx(slowed * 0.8)  # congested, a tick later: a fifth less
    ceiling = outflow.ceiling
    climbed = [quick(outflow) for _ in range(8)]
    assert max(climbed) > ceiling
    assert sum(1 for rate in climbed if rate < ceiling * 0.9) <= 2  # back near it in two ticks
    steps = [later / earlier for earlier, later in zip(climbed, climbed[1:]) if earlier >= ceiling * 0.9]
    assert steps == sorted(steps) and steps[0] < 1.1  # probing above it: gently at first, then faster


def test_while_buyers_join_fast_the_outflow_grows_by_a_tenth_a_tick():
    # Sales open: each join and its first held wait take a worker's CPU too (POST p99 1-3 s at an outflow of
    # 150-200 during 600 joins a second).
    from eventi_flask.line.admitter import Outflow

    outflow = Outflow(start=40, cap=None)
    outflow.joined(600, 1.0)
    assert quick(outflow) == pytest.approx(40 * 1.1 + 1)
    outflow.joined(30, 1.0)  # the burst has passed
    assert quick(outflow) == pytest.approx(45 * 1.3 + 1)


def test_while_buyers_join_on_a_late_loop_the_outflow_eases_and_keeps_no_ceiling():
    from eventi_flask.line.admitter import Outflow

    outflow = Outflow(start=40, cap=None, rate=100)  # a new lead, from the rate the line was published at
    outflow.joined(600, 1.0)
    assert quick(outflow, lag=0.02) == pytest.approx(95)  # the joins wait for the loop: a twentieth less
    assert quick(outflow, 2, lag=0.02) == pytest.approx(95)  # once per three ticks
    assert outflow.ceiling is None  # the joins' CPU, not the orders': no ceiling for after the burst
    assert quick(outflow, 60, lag=0.02) == 40  # and never below the start: thousands wait on it
    assert quick(outflow, answers=2.0) == pytest.approx(32)  # a congestion meanwhile is still acted on at once


def test_a_forming_line_shows_the_rate_the_last_line_averaged_until_it_has_measured_its_own():
    # The joins' burst holds the outflow back while those joining are told how long the line will take
    # once it has passed: the rate shown falling 2 % a second from the learned rate during the burst told the
    # last joiners 45 s for a wait of 35.
    from eventi_flask.line.admitter import LEARN_AFTER_SECONDS, Outflow

    outflow = Outflow(start=40, cap=None, measured=130, expected=130)
    for _ in range(LEARN_AFTER_SECONDS - 1):
        outflow.measure(60, 0, 1.0)
        assert outflow.measured == 130
    for _ in range(5):
        outflow.measure(60, 0, 1.0)
    assert outflow.measured == pytest.approx(130 * 0.98 ** 5)  # measured long enough: its own, falling gently


def test_the_outflow_follows_answer_times_within_its_cap():
    from eventi_flask.line.admitter import Outflow

    outflow = Outflow(start=20, cap=50)
    assert quick(outflow, 30) == 50  # quick answers, a line waiting: up to the event's max_rate
    assert quick(outflow, answers=1.5) == 40  # p90 past 1.2 s: a fifth less
    assert quick(outflow, 2, shed_share=0.2) == 40  # held: those answers are of places taken before
    assert quick(outflow, shed_share=1) == pytest.approx(32)  # the worker itself says it is past capacity
    assert quick(outflow, 2, shed_share=0.2) == pytest.approx(32)
    assert quick(outflow, shed_share=0.2) == pytest.approx(32 * 0.95)  # its loop late: a twentieth less


def test_after_a_burst_the_outflow_is_back_at_its_start_at_once():
    """The arrivals' burst slows every answer and cuts the outflow far below where it started; once the
    answers are quick again it goes back to that start in one tick (a rate the service took), not in
    steps from the trough."""
    from eventi_flask.line.admitter import Outflow

    outflow = Outflow(start=40, cap=None)
    assert quick(outflow, 12, shed_share=0.6, answers=2.0) < 40 / 2  # twelve seconds of slow answers
    assert quick(outflow) == 40


@pytest.mark.env(LINE_FORCE="1", LINE_TICK="0.1", LINE_START_RATE="40")
def test_a_line_that_ran_long_enough_teaches_the_next_where_to_start(app, client, wire, settings, monkeypatch):
    # At an opening nearly everyone joins within seconds, before the line has measured anything: their
    # estimates use the start rate.  A line served long enough leaves its average for the next one (and a
    # restarted instance), so a rehearsal, or the last sale, sets it rather than LINE_START_RATE's guess.
    from eventi_flask.line import admitter, service

    monkeypatch.setattr(admitter, "LEARN_AFTER_SECONDS", 0.5)
    monkeypatch.setattr(service, "EVENT_CACHE_SECONDS", 0.0)  # the start rate read again at each ask
    set_event(app, line_max_rate=None)
    line = app.extensions[LINE]
    assert line.store.learned_rate() is None
    places = [join(client).get_json()["queue"]["id"] for _ in range(30)]
    assert all(served(client, p)["status"] == "admitted" for p in places)
    wait_until(line.store.learned_rate, message="a rate learned")
    line.stop()  # no more ticks: the rate learned is the line's last word
    learned = line.store.learned_rate()
    assert 0 < learned != 40

    # With Redis, the next deploy or another instance knows it; in the process, this one does.  It raises
    # LINE_START_RATE (set low here, whatever a slow machine learned), never lowers it.
    later = create_app(config.TestConfig({**settings, "LINE_START_RATE": "1"})) if "REDIS_URL" in settings else app
    try:
        with later.app_context():
            later_line = later.extensions[LINE]
            later_line.configured_start_rate = 1.0
            assert later_line.start_rate() == pytest.approx(learned)
            # a fresh line's first estimate: 100 ahead over the learned rate, not over 40
            view = {"rate": 0.0, "share": 0.0}
            estimate = service.estimated_wait(100, view, service.EventLine(db.session.scalar(select(Event))))
            assert estimate == math.ceil(100 / learned)
            later_line.configured_start_rate = learned * 2  # a LINE_START_RATE above what was learned stays
            assert later_line.start_rate() == pytest.approx(learned * 2)
            db.session.remove()
    finally:
        if later is not app:
            shut_down(later)


DEAD_REDIS = f"redis://127.0.0.1:{free_port()}/0"


@pytest.mark.parametrize("backend", ["postgres-redis"])
@pytest.mark.env(REDIS_URL=DEAD_REDIS, LINE_FORCE="1")
def test_a_line_whose_redis_is_away_answers_503_busy_and_saves_nothing(app, client, wire):
    answer = join(client)

    assert answer.status_code == 503 and answer.get_json()["error"]["code"] == "busy"
    assert "Retry-After" in answer.headers and order_rows(app) == []
    assert client.get("/api/events/test-this-end-to-end").get_json()["line"] is None
