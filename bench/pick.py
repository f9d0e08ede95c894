"""
Micro-benchmark of C{IBalancer.pick} for each registered algorithm at 2, 20
and 200 targets, printed as a Markdown table of nanoseconds per call.

    PYTHONPATH=. .venv/bin/python bench/pick.py

"pick" is one call; "attempt" is a pick followed by C{started} and
C{finished}, what one proxied attempt costs the balancer.  Every target is
available and nothing is excluded (the common case); consistent hashing
hashes a header that differs between requests.  Each figure is the best of
5 runs of a bounded loop, so the whole takes a few seconds.
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable
from itertools import cycle, islice

from twisted.web.http_headers import Headers

from aigateway.balancer import registry
from aigateway.balancer.context import PickContext
from aigateway.model import Target, Upstream
from aigateway.records import build_record

SIZES = (2, 20, 200)
CALLS = 20_000
REPEAT = 5


class _AllUp:
    """
    A health view where every target is available.
    """

    def available(self, target: Target) -> bool:
        return True


def _upstream(algorithm: str) -> Upstream:
    fields = {"name": "bench", "algorithm": algorithm}
    if algorithm == "consistent-hashing":
        fields |= {"hash_on": "header", "hash_on_header": "x-user"}
    record, errors = build_record("upstreams", fields, False)
    assert not errors, errors
    return Upstream.from_record(record | {"id": "u"})


def _targets(count: int) -> list[Target]:
    return [
        Target(
            id=f"t{i}",
            upstream_id="u",
            key=f"10.0.{i // 250}.{i % 250}:8000",
            host=f"10.0.{i // 250}.{i % 250}",
            port=8000,
            weight=100,
        )
        for i in range(count)
    ]


def _contexts() -> list[PickContext]:
    contexts = []
    for i in range(1000):
        headers = Headers()
        headers.addRawHeader("x-user", f"user-{i}")
        contexts.append(PickContext(headers=headers, client_ip="127.0.0.1"))
    return contexts


def _time(loop: Callable[[], None]) -> float:
    """
    Nanoseconds per call of the best of L{REPEAT} runs of C{loop}, which
    makes L{CALLS} calls.
    """
    best = min(timeit.repeat(loop, number=1, repeat=REPEAT))
    return best / CALLS * 1e9


def measure(algorithm: str, size: int) -> tuple[float, float]:
    """
    The cost of a pick, and of a whole attempt, in nanoseconds.
    """
    balancer = registry.lookup(algorithm).build(
        _upstream(algorithm), _targets(size), _AllUp()
    )
    contexts = list(islice(cycle(_contexts()), CALLS))
    pick, started, finished = balancer.pick, balancer.started, balancer.finished
    exclude: tuple[str, ...] = ()

    def picks() -> None:
        for context in contexts:
            pick(context, exclude)

    def attempts() -> None:
        for context in contexts:
            target = pick(context, exclude)
            assert target is not None
            started(target)
            finished(target, 0.01)

    attempts()  # warm up: averages, in-flight heaps
    return _time(picks), _time(attempts)


def main() -> None:
    print("| algorithm | " + " | ".join(f"{n} targets" for n in SIZES) + " |")
    print("|---|" + "---:|" * len(SIZES))
    for name in registry.names():
        figures = [measure(name, size) for size in SIZES]
        cells = [f"{p / 1000:.2f} µs ({a / 1000:.2f} µs)" for p, a in figures]
        print(f"| {name} | " + " | ".join(cells) + " |")
        sys.stdout.flush()
    print()
    print("Each cell: pick() (pick + started + finished), per call.")


if __name__ == "__main__":
    main()
