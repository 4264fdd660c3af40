"""Prometheus metrics, one registry per process (GET /metrics reports the worker that answers)."""
import gc
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

registry = CollectorRegistry()

waiters = Gauge("eventi_waiters", "Long-poll requests held right now in this process", registry=registry)
subscribed_channels = Gauge("eventi_subscribed_channels", "Redis channels this process is subscribed to", registry=registry)
wait_duration = Histogram(
    "eventi_wait_duration_seconds", "How long a /wait request was held", ["result"], registry=registry,
    buckets=(0.005, 0.05, 0.5, 1, 5, 15, 30, 45, 60, 90),
)
delivery_latency = Histogram(
    "eventi_delivery_latency_seconds", "From publish after the callback's commit to the held wait answering",
    registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
callback_duration = Histogram(
    "eventi_callback_duration_seconds", "Time to store, apply and publish one PayHero callback",
    registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
payments_refund_due = Counter(
    "eventi_payments_refund_due_total",
    "Payments confirmed for a failed or cancelled order with no tickets left to give it: each one is owed back",
    registry=registry)
callbacks = Counter("eventi_callbacks_total", "PayHero callbacks by outcome", ["outcome"], registry=registry)
callbacks_missing = Counter("eventi_callbacks_missing_total",
                            "Pending orders PayHero was asked about because no callback came within PAYHERO_ASK_AFTER",
                            registry=registry)
payments_asked = Counter("eventi_payments_asked_total", "Asks to PayHero's transaction-status about an order whose "
                         "callback never came, by what came of it: completed, failed, cancelled (settled), unchanged, "
                         "pending (not processed yet), error (PayHero not reached)", ["outcome"], registry=registry)
listener_connected = Gauge("eventi_redis_listener_connected", "1 while the subscriber connection to this Redis node is up",
                           ["node"], registry=registry)
redis_transitions = Counter("eventi_redis_transitions_total", "Redis subscriber connects and disconnects", ["state"], registry=registry)
publish_failures = Counter("eventi_redis_publish_failures_total", "Notifications that could not be published", registry=registry)
database_available = Gauge("eventi_database_available", "0 while the database cannot be reached", registry=registry)
database_transitions = Counter("eventi_database_transitions_total", "Database outages and recoveries", ["state"],
                               registry=registry)
db_queries = Counter("eventi_db_queries_total", "SQL statements executed by this process", registry=registry)
waits_departed = Counter("eventi_waits_departed_total",
                         "Held waits let go because their client closed the connection", registry=registry)
orders_shed = Counter("eventi_orders_shed_total", "Orders answered 503 busy before anything was saved",
                      registry=registry)
loop_lag = Gauge("eventi_event_loop_lag_seconds", "Moving average of how late this worker's event loop runs, "
                 "as arriving orders measure it (ORDER_SHED_LAG)", registry=registry)
line_length = Gauge("eventi_line_length", "Places waiting in an event's line (set by the worker admitting it)",
                    ["event"], registry=registry)
line_admitted = Counter("eventi_line_admitted_total", "Places whose turn came, by what their order became",
                        ["event", "outcome"], registry=registry)
line_left = Counter("eventi_line_left_total", "Places left: their page stopped asking (LINE_PATIENCE)", ["event"],
                    registry=registry)
line_wait = Histogram("eventi_line_wait_seconds", "From joining an event's line to its turn", registry=registry,
                      buckets=(1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200))
wait_rejected = Counter("eventi_wait_rejected_total", "Wait requests refused by a limit", ["limit"], registry=registry)
# A collection stops every greenlet of the worker at once: with thousands of waits held,
# a full one shows as a latency spike for everyone, so its pauses are worth seeing.
gc_pause = Histogram(
    "eventi_gc_pause_seconds", "Pauses of Python's cyclic garbage collector, by generation", ["generation"],
    registry=registry, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
_gc_started = 0.0


def _time_gc(phase, info):
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        gc_pause.labels(str(info["generation"])).observe(time.perf_counter() - _gc_started)


gc.callbacks.append(_time_gc)
# The tickets' SMS and email (eventi_flask/messages).  The gauges are refreshed by each process's sender
# every MESSAGES_SWEEP_INTERVAL (one query), not per scrape.
messages = Counter("eventi_messages_total", "Tickets' messages: sent, failed for good, or to be tried again",
                   ["channel", "outcome"], registry=registry)
outbox_pending = Gauge("eventi_outbox_pending", "Messages waiting in the outbox to be sent (all processes)",
                       registry=registry)
outbox_oldest_pending = Gauge("eventi_outbox_oldest_pending_seconds",
                              "Age of the oldest message waiting in the outbox; 0 when none waits", registry=registry)
