"""The Prometheus alert rules shipped in deploy/prometheus, checked with Debian's promtool.

`promtool check rules` validates them; `promtool test rules` runs their unit tests
(alerts_test.yml), where every alert must be shown firing at least once.  The
metrics they watch must be ones the app exports, so a rename cannot silently
leave an alert watching nothing.
"""
import re
import shutil
import subprocess

import yaml

from eventi_flask import metrics
from tests.support import ROOT

RULES = ROOT / "deploy" / "prometheus"
REQUIRED = {  # what issue 17 asks to be alerted on, by the alert that does it
    "payments due a refund": "EventiPaymentRefundDue",
    "callbacks failing": "EventiCallbacksFailing",
    "callbacks refused": "EventiCallbacksRefused",
    "a subscriber disconnected": "EventiRedisSubscriberDisconnected",
    "waits refused": "EventiWaitsRefused",
    "database unavailable": "EventiDatabaseUnavailable",
    "the outbox stalls (issue 25)": "EventiOutboxStalled",
    "a stalled line (issue 23)": "EventiLineStalled",
}


EXPORTED = {metric.name for metric in metrics.registry.collect()}  # a counter's without its _total


def watched_metrics(expression):
    """The app's metrics a PromQL expression reads, by their exported names (no _total, _bucket)."""
    return {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in re.findall(r"\beventi_[a-z_]+", expression)}


def promtool(*args):
    # scripts/test.sh installs it (ensure_promtool); its absence is a failure, never a skip.
    assert shutil.which("promtool"), "promtool is missing: run the suite with scripts/test.sh"
    return subprocess.run(["promtool", *args], cwd=RULES, capture_output=True, text=True, timeout=60)


def alerts():
    groups = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_the_rules_are_valid():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_every_alert_passes_its_unit_tests_and_is_shown_firing():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"]
    fired = {check["alertname"] for test in tests for check in test["alert_rule_test"] if check["exp_alerts"]}
    assert set(REQUIRED.values()) <= set(alerts()) == fired


def test_the_alerts_watch_metrics_the_app_exports():
    for name, rule in alerts().items():
        watched = watched_metrics(rule["expr"])
        assert watched and watched <= EXPORTED, (name, watched - EXPORTED)


def test_the_grafana_dashboard_charts_metrics_the_app_exports():
    import json

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "eventi.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            watched = watched_metrics(target["expr"])
            assert watched and watched <= EXPORTED, (panel["title"], watched - EXPORTED)
