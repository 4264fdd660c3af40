"""charts: draw the benchmarks' JSON results as PNGs (matplotlib, a benchmark-only requirement).

    python -m bench charts [--results bench-results] [--nchan FILE] [--out docs/benchmarks]

held-latency.png: the held waits' callback -> answer percentiles (held and storm
runs, one panel per number of waits) beside Nchan's publish -> arrival from
the same kind of run (../shared/bench/nchan_bench.py's nchan-results.json).
journeys.png: journeys/s, and the order answer's and the outcome's p99,
against the buyers' arrival rate (journeys and overload runs), every run a point.
"""
import json
import statistics
import sys
from pathlib import Path

from .results import RESULTS_DIR, read_reports
from .server import ROOT

QUANTILES = ("p50", "p90", "p99", "max")
DEFAULT_NCHAN = ROOT.parent / "shared" / "bench" / "nchan-results.json"
DEFAULT_OUT = ROOT / "docs" / "benchmarks"


def add_arguments(parser):
    parser.add_argument("--results", default=str(RESULTS_DIR), help="folder of the JSON results (default bench-results)")
    parser.add_argument("--nchan", default=str(DEFAULT_NCHAN), help="nchan_bench.py's results (skipped if absent)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the PNGs (default docs/benchmarks)")


def held_series(reports):
    """{number of waits: [[p50, p90, p99, max] ms of each run]} of the held and storm runs (long poll only)."""
    series = {}
    for report in reports:
        if report["mode"] not in ("held", "storm") or report["args"].get("short_poll"):
            continue
        for run in report["runs"]:
            values = [run["latency_ms"].get(q) for q in QUANTILES]
            if None not in values:
                series.setdefault(run["orders"], []).append(values)
    return series


def nchan_series(path):
    """The same shape from Nchan's rounds."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    series = {}
    for run in data.get("runs", []):
        for round_ in run.get("rounds", []):
            values = [round_.get(f"{q}_ms") for q in QUANTILES]
            if "failed" not in round_ and None not in values:
                series.setdefault(round_["N"], []).append(values)
    return series


def journey_points(reports):
    """[(mode, arrival rate, journeys/s, order answer p99 ms, outcome after callback p99 ms)] of every run."""
    return [(report["mode"], run["arrival_rate"], run["journeys_per_second"], run["order_answer_ms"]["p99"],
             run["outcome_after_callback_ms"]["p99"])
            for report in reports if report["mode"] in ("journeys", "overload") for run in report["runs"]]


def draw_held(plt, eventi, nchan, path):
    import matplotlib.ticker

    sizes = sorted(set(eventi) | set(nchan))
    figure, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.2), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for label, series, colour in (("Eventi", eventi, "tab:blue"), ("Nchan", nchan, "tab:orange")):
            for i, values in enumerate(series.get(n, [])):
                ax.plot(QUANTILES, values, marker="o", color=colour, alpha=0.8, label=label if i == 0 else None)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(f"{n:,} held waits")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("ms (log scale)")
    figure.suptitle("Held wait answered after the event\nEventi: callback -> answer; Nchan: publish -> arrival\n"
                    "(every run a line)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def draw_journeys(plt, points, path):
    import matplotlib.ticker

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rates = sorted({p[1] for p in points})
    for mode, marker in (("journeys", "o"), ("overload", "s")):
        mine = [p for p in points if p[0] == mode]
        if not mine:
            continue
        left.scatter([p[1] for p in mine], [p[2] for p in mine], marker=marker, label=mode)
        right.scatter([p[1] for p in mine], [p[3] / 1000 for p in mine], marker=marker, color="tab:red",
                      label=f"order answer p99 ({mode})")
        right.scatter([p[1] for p in mine], [p[4] / 1000 for p in mine], marker=marker, color="tab:green",
                      label=f"outcome after callback p99 ({mode})")
    medians = [statistics.median(p[2] for p in points if p[1] == rate and p[2] is not None) for rate in rates]
    left.plot(rates, medians, color="tab:blue", alpha=0.5, label="median")
    left.plot([0, max(rates)], [0, max(rates)], linestyle=":", color="grey", label="every arrival served")
    left.set_xlabel("buyers arriving per second")
    left.set_ylabel("journeys per second")
    left.legend()
    for target, label in ((2, "order p99 target 2 s"), (1, "outcome p99 target 1 s")):
        right.axhline(target, linestyle="--", color="grey", linewidth=0.8)
        right.annotate(label, (rates[0], target), fontsize=7, va="bottom")
    right.set_yscale("log")
    right.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    right.set_xlabel("buyers arriving per second")
    right.set_ylabel("seconds (log scale)")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    figure.suptitle("Whole journeys (order, sandbox payment, outcome) against the arrival rate", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = read_reports(args.results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    eventi, nchan = held_series(reports), nchan_series(args.nchan)
    if eventi:
        draw_held(plt, eventi, nchan, out / "held-latency.png")
        drawn.append(out / "held-latency.png")
    points = [p for p in journey_points(reports) if None not in p]
    if points:
        draw_journeys(plt, points, out / "journeys.png")
        drawn.append(out / "journeys.png")
    if not drawn:
        print(f"charts: no held, storm, journeys or overload results in {args.results}", file=sys.stderr)
        return 1
    for path in drawn:
        print(path)
    return 0
