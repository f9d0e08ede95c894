"""
Summarises a py-spy ``--format raw --full-filenames`` profile (collapsed
stacks, one ``frame;frame;... count`` line per distinct stack) of the main
thread into the hottest functions: self time (the function is the innermost frame) and total time
(the function is anywhere on the stack), as shares of all samples.

Usage: python bench/profile_top.py profile.raw [--top 15]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_LINE = re.compile(r"\s*\(([^()]*?)(?::\d+)?\)\s*$")


def _name(frame: str) -> str:
    """
    ``render (aigateway/proxy/resource.py:114)`` -> ``render (aigateway/proxy/resource.py)``,
    with site-packages and standard-library prefixes shortened.
    """
    match = _LINE.search(frame)
    if not match:
        return frame.strip()
    function = frame[: match.start()].strip()
    path = match.group(1)
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/aigateway/" in path:
        path = "aigateway/" + path.rsplit("/aigateway/", 1)[1]
    elif "/lib/python3." in path:
        path = "stdlib/" + path.split("/lib/python3.", 1)[1].split("/", 1)[-1]
    return f"{function} ({path})"


def summarise(path: str) -> tuple[int, Counter[str], Counter[str]]:
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count_text = line.rpartition(" ")
            try:
                count = int(count_text)
            except ValueError:
                continue
            frames = [_name(frame) for frame in stack.split(";") if frame]
            # Only the main (reactor) thread: idle pool threads waiting on a
            # condition are not cost.
            if not frames or not frames[0].startswith("<module>"):
                continue
            total += count
            own[frames[-1]] += count
            for name in set(frames):
                inclusive[name] += count
    return total, own, inclusive


def markdown(path: str, top: int = 15) -> str:
    total, own, inclusive = summarise(path)
    if not total:
        return "(no samples)\n"
    lines = [
        f"{total} samples of the main thread. Self: the function itself is running; total: it is on the stack.",
        "",
        "| # | hottest by self time | self % | total % |",
        "|---|---|---:|---:|",
    ]
    for i, (name, count) in enumerate(own.most_common(top), 1):
        lines.append(
            f"| {i} | `{name}` | {100 * count / total:.1f} | {100 * inclusive[name] / total:.1f} |"
        )
    lines += [
        "",
        "| # | by total time (below the reactor loop: < 50 %) | total % | self % |",
        "|---|---|---:|---:|",
    ]
    below = [(n, c) for n, c in inclusive.most_common() if c < total / 2]
    for i, (name, count) in enumerate(below[:top], 1):
        lines.append(
            f"| {i} | `{name}` | {100 * count / total:.1f} | {100 * own[name] / total:.1f} |"
        )
    lines += [
        "",
        "| # | aigateway functions by total time | total % | self % |",
        "|---|---|---:|---:|",
    ]
    ours = [(n, c) for n, c in inclusive.most_common() if "aigateway/" in n]
    for i, (name, count) in enumerate(ours[:top], 1):
        lines.append(
            f"| {i} | `{name}` | {100 * count / total:.1f} | {100 * own[name] / total:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=15)
    options = parser.parse_args()
    print(markdown(options.profile, options.top), end="")
