#!/usr/bin/env python3
"""Summarise a py-spy collapsed-stack file (scripts/loadtest.py --py-spy FILE).

    .venv/bin/python scripts/bench_profile.py FILE [--focus FUNCTION] [--top 25]

With --focus, only the samples whose stack passes through a frame containing
FUNCTION count (e.g. "callback (eventi_flask/payhero/routes.py" or
"wait (eventi_flask/orders/routes.py"); the percentages are of those samples.
Prints the functions by inclusive share (time spent in them and below) and by
self share (time spent in their own code), idle hub time excluded.
"""
import argparse
import collections
import re

IDLE = ("run (gevent/hub.py", "wait (gevent/_hub_primitives.py")


def frame_name(frame):
    # "function (path/to/module.py:123)" -> "function (path/to/module.py)"; keep only the last package parts
    name = re.sub(r":\d+\)$", ")", frame.strip())
    name = re.sub(r"\(/.*?/(site-packages|lib/python3\.\d+)/", "(", name)
    return re.sub(r"\(/work/main/", "(", name)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--focus")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    inclusive, own = collections.Counter(), collections.Counter()
    total = idle = 0
    for line in open(args.file):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        count = int(count)
        frames = [frame_name(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if args.focus and not any(args.focus in f for f in frames):
            continue
        if frames and frames[-1].startswith(IDLE):
            idle += count
            continue
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    print(f"{total} busy samples" + (f" through {args.focus!r}" if args.focus else "") + f", {idle} idle (hub waiting)")
    if not total:
        return
    print(f"\n{'inclusive':>9}  function")
    for frame, count in inclusive.most_common(args.top):
        print(f"{100 * count / total:8.1f}%  {frame}")
    print(f"\n{'self':>9}  function")
    for frame, count in own.most_common(args.top):
        print(f"{100 * count / total:8.1f}%  {frame}")


if __name__ == "__main__":
    main()
