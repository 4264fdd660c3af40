"""The benchmark tool, at toy size against real servers it starts, so that it cannot rot.

Timings are not checked (the machine is shared): that every mode runs to the
end, says what it saw in one line, and writes every run's numbers as JSON.
"""
import json
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.live, pytest.mark.load]


def bench(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def run_mode(tmp_path, mode, *args):
    out = tmp_path / f"{mode}.json"
    done = bench(mode, *args, "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(f"{mode} run ")]
    assert len(lines) == 1, done.stdout
    report = json.loads(out.read_text())
    assert report["mode"] == mode and len(report["runs"]) == 1
    return lines[0], report["runs"][0]


def test_storm_holds_every_wait_and_answers_each_callback(tmp_path):
    line, run = run_mode(tmp_path, "storm", "-n", "60", "--rate", "60", "--timeout", "20")
    assert "held 60" in line and ", refused 0;" in line and "60 notified" in line
    assert "subscriber disconnects 0" in line and run["subscriber_disconnects"] == 0
    assert run["refused"] == 0 and run["held_all"] and run["wrong_status"] == 0
    assert run["latency_ms"]["n"] == 60 and run["latency_ms"]["max"] >= run["latency_ms"]["p99"] > 0


def test_journeys_end_in_the_outcome_each_phone_decides(tmp_path):
    line, run = run_mode(tmp_path, "journeys", "--buyers", "40", "--rate", "20", "--timeout", "20",
                         "--server-env", "SANDBOX_CALLBACK_DELAY=0.5")
    assert "40 buyers at 20/s" in line
    assert run["journeys"] == 40 and run["wrong_outcomes"] == 0 and run["duplicate_orders"] == 0
    # Of every 20 buyers 2 cancel and 1 lacks funds.
    assert run["outcomes"] == {"cancelled": 4, "completed": 34, "failed": 2}
    assert run["outcome_after_callback_ms"]["n"] == 40 and run["callback_delay_s"] == 0.5


def test_journeys_deliver_each_paid_order_one_sms_and_one_email_to_real_providers(tmp_path):
    line, run = run_mode(tmp_path, "journeys", "--deliver", "--buyers", "20", "--rate", "20", "--timeout", "20",
                         "--server-env", "SANDBOX_CALLBACK_DELAY=0.5")
    delivered = run["messages"]["delivered"]
    # Of 20 buyers 17 pay: what the SMTP server and the Africa's Talking stand-in received, by receipt.
    assert run["outcomes"]["completed"] == delivered["paid_orders"] == delivered["orders_with_one_of_each"] == 17
    for channel in ("sms", "email"):
        assert delivered[channel]["received"] == 17 and delivered[channel]["after_completion_ms"]["n"] == 17
        assert delivered[channel]["orders_without"] == delivered[channel]["orders_with_more_than_one"] == 0
        assert 0 < delivered[channel]["after_completion_ms"]["max"] < 60_000
    assert delivered["received_for_no_paid_order"] == delivered["received_by_another_recipient"] == 0
    assert "one SMS and one email each 17" in line and run["stand_ins_cpu_s"] is not None
    assert run["failures"] == [] and run["worker_cpu_ms_per_journey"] > 0


def test_overload_serves_every_buyer_once_and_makes_no_duplicate(tmp_path):
    _, run = run_mode(tmp_path, "overload", "--buyers", "40", "--rate", "40", "--timeout", "20",
                      "--server-env", "SANDBOX_CALLBACK_DELAY=0.5")
    assert run["served"] == run["served_exactly_once"] == 40
    assert run["orders_in_database"] == 40 and run["duplicate_orders"] == 0
    assert run["order_answer_ms"]["n"] == run["order_answers"] >= 40


def test_an_order_made_for_a_buyer_whose_answer_was_lost_is_not_a_duplicate():
    """A buyer whose POST timed out after its order was made, and who gave up before asking again with the
    same Idempotency-Key, left an order nobody was answered: counted apart, not as a duplicate."""
    import psycopg

    from bench.journeys import Buyer, orders_of_unanswered_buyers
    from tests.support import create_database, drop_database

    answered, gave_up, never_made = Buyer(0), Buyer(1), Buyer(2)
    answered.order_ids.add("order-a")
    name, url = create_database()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE idempotency_keys (key varchar PRIMARY KEY, order_id varchar)")
            conn.execute("INSERT INTO idempotency_keys VALUES (%s, 'order-a'), (%s, 'order-b')",
                         (answered.key, gave_up.key))
        assert orders_of_unanswered_buyers(url, [answered, gave_up, never_made]) == 1
    finally:
        drop_database(name)


def test_line_answers_every_buyer_at_once_and_serves_each_once_in_the_order_they_joined(tmp_path):
    # LINE_FORCE: every buyer joins the line, as past capacity; a quarter stop asking once they have a place.
    line, run = run_mode(tmp_path, "line", "--buyers", "40", "--rate", "40", "--timeout", "20", "--leave-share", "0.25",
                         "--patience", "4", "--server-env", "SANDBOX_CALLBACK_DELAY=0.5", "--server-env", "LINE_PATIENCE=4",
                         "--server-env", "LINE_FORCE=1")
    assert "40 buyers at 40/s (leaving 0.25)" in line and "fairness" in line
    assert run["order_answers_5xx"] == 0 and run["order_statuses"] == {"202": 40} and run["queued"] == 40
    assert run["place_outcomes"]["admitted"] == run["admitted"] and run["place_outcomes"]["stopped asking"] > 0
    assert run["order_answer_ms"]["n"] == run["order_answers"] >= 40
    assert run["served_exactly_once"] == run["admitted"] == run["journeys"] > 0
    assert run["duplicate_orders"] == 0 and run["wrong_outcomes"] == 0
    assert run["tickets_held"] == run["tickets_paid"] + run["tickets_pending"]
    assert run["fairness_s"] is not None and run["worker_cpu_ms_per_journey"] > 0


def test_resets_counts_what_a_once_only_keep_alive_sender_lost(tmp_path):
    line, run = run_mode(tmp_path, "resets", "--buyers", "40", "--rate", "40", "--callback-rate", "20",
                         "--timeout", "20", "--server-env", "SANDBOX_CALLBACK_DELAY=0.5")
    assert "sender: 20 callbacks" in line and "0 orders left pending" in line
    assert run["sender_orders_pending"] == run["buyer_orders_pending"] == 0 and run["duplicate_orders"] == 0
    assert run["sender_failures"] == {} and run["tracebacks"] == 0


def test_storm_profiles_the_worker(tmp_path):
    _, run = run_mode(tmp_path, "storm", "-n", "40", "--rate", "40", "--timeout", "20",
                      "--profile", str(tmp_path / "storm.txt"))
    assert (tmp_path / "storm.txt").stat().st_size > 0  # py-spy recorded the worker
    # The busiest functions (at toy size a quiet worker may show none besides the idle hub).
    assert isinstance(run["profile_top"], list) and all(0 < share <= 1 for share, _ in run["profile_top"])


def test_a_mistake_in_the_options_is_one_line_and_a_non_zero_exit():
    done = bench("journeys", "--rate", "-5", timeout=60)
    assert done.returncode == 2 and done.stderr == "python -m bench: error: --rate must be positive\n"


def test_charts_are_drawn_from_the_results_beside_nchan(tmp_path):
    results, out = tmp_path / "results", tmp_path / "charts"
    results.mkdir()
    spread = {"n": 1000, "p50": 9.0, "p90": 14.0, "p99": 40.0, "max": 80.0}
    (results / "held-1.json").write_text(json.dumps({"mode": "held", "args": {"short_poll": False},
                                                     "runs": [{"orders": 1000, "latency_ms": spread}] * 3}))
    (results / "journeys-1.json").write_text(json.dumps({"mode": "journeys", "args": {}, "runs": [
        {"arrival_rate": rate, "journeys_per_second": rate * 0.8, "order_answer_ms": spread,
         "outcome_after_callback_ms": spread} for rate in (100, 200, 300)]}))
    nchan = tmp_path / "nchan-results.json"
    nchan.write_text(json.dumps({"runs": [{"rounds": [{"N": 1000, "p50_ms": 1.1, "p90_ms": 2.0, "p99_ms": 4.0,
                                                       "max_ms": 9.0}]}]}))
    done = bench("charts", "--results", str(results), "--nchan", str(nchan), "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(out / "held-latency.png"), str(out / "journeys.png")]
    for name in ("held-latency.png", "journeys.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    empty = bench("charts", "--results", str(tmp_path / "none"), "--out", str(out), timeout=120)
    assert empty.returncode == 1 and len(empty.stderr.splitlines()) == 1


def test_floor_measures_the_workers_cpu_a_request(tmp_path):
    line, run = run_mode(tmp_path, "floor", "-n", "200", "--connections", "4", "--new-connections")
    assert run["requests"] == 200 and "us a request" in line
    assert 0 < run["worker_cpu_us_per_request"] < 100_000  # a real figure, read from the worker's /proc
