"""One result format for every mode: a summary line per run on stdout, and one JSON file with every run.

The JSON (bench-results/<mode>-<UTC time>.json unless --json) is
{"mode", "command", "machine", "args", "runs": [one dict per run]}; a latency in
a run is {"n", "p50", "p90", "p99", "max"} in milliseconds.  `python -m bench
charts` reads these files.
"""
import json
import os
import sys
import time
from pathlib import Path

from .server import ROOT

RESULTS_DIR = ROOT / "bench-results"


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def spread(values_ms):
    """{"n", "p50", "p90", "p99", "max"} of some milliseconds (None where there are none)."""
    values = [v for v in values_ms if v is not None]
    out = {"n": len(values)}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100)):
        value = percentile(values, q)
        out[name] = None if value is None else round(value, 1)
    return out


def count_by(items):
    """{str(item): how many}, sorted."""
    counts = {}
    for item in items:
        counts[str(item)] = counts.get(str(item), 0) + 1
    return dict(sorted(counts.items()))


def rounded(value, digits=2):
    return None if value is None else round(value, digits)


def ms(value):
    """A latency for a summary line: 8.6 ms, 1,904 ms, 5.4 s."""
    if value is None:
        return "-"
    if value >= 10000:
        return f"{value / 1000:.1f} s"
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms"


def latency(label, values):
    return f"{label} p50/p99/max {ms(values['p50'])} / {ms(values['p99'])} / {ms(values['max'])}"


def write_report(mode, args, runs, path=None):
    """Write every run's numbers as JSON; the path."""
    if path is None:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"{mode}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    report = {
        "mode": mode,
        "command": " ".join(["python -m bench"] + sys.argv[1:]),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average_at_end": os.getloadavg()},
        "args": {k: v for k, v in vars(args).items() if k != "run"},
        "runs": runs,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def read_reports(folder):
    """Every report in `folder` (skipping files that are not one)."""
    reports = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and "mode" in report and "runs" in report:
            reports.append(report)
    return reports
