"""charts: draw the benchmarks' JSON results as PNGs (matplotlib, a benchmark-only requirement)."""


def add_arguments(parser):
    pass


def main(args):
    return 0
