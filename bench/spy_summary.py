"""Summarise a py-spy raw (collapsed) profile: top leaf frames (self time) and top frames by inclusive time.

.venv/bin/py-spy record --native -r 200 -p PID -f raw -o prof.txt
.venv/bin/python bench/spy_summary.py prof.txt [--top 25] [--match SUBSTRING]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

_ADDR = re.compile(r"^0x[0-9a-f]+ \((.*)\)$")


def _name(frame: str) -> str:
    frame = frame.strip()
    m = _ADDR.match(frame)
    if m:
        return f"[{m.group(1)}]"  # an unresolved native frame: keep the library name
    return re.sub(r":\d+\)$", ")", frame)  # drop line numbers so a function is one entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("file", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--match", help="only stacks containing this substring")
    args = p.parse_args(argv)
    leaf: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in args.file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if args.match and args.match not in stack:
            continue
        n = int(count)
        frames = [_name(f) for f in stack.split(";")]
        total += n
        leaf[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        print("no samples")
        return 1
    print(f"{total} samples")
    print("\nself (leaf frames):")
    for name, n in leaf.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\ninclusive:")
    for name, n in incl.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
