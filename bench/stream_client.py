"""
A streaming load client for the benchmark: opens many concurrent
server-sent-event requests with raw asyncio sockets and measures, per
stream, the time to the first ``data:`` chunk and the total time.

Each stream is one connection (``Connection: close``) that POSTs a small
chat request and reads to the end; it succeeds when the answer is a 200
with ``chunks`` data chunks plus ``data: [DONE]``.  Streams are opened all
at once, or ``--ramp`` streams a second, and every stream is bounded by
``--timeout``.  Prints one JSON object with percentiles, errors and the
peak number of streams open at the same time.

Usage: python bench/stream_client.py --port 8000 --streams 100 --chunks 20
    --delay 0.02 [--rounds 3] [--warmup 1] [--ramp 2000] [--timeout 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from typing import Any

BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in twenty tokens, please."},
        ],
    }
).encode()


class Stats:
    def __init__(self) -> None:
        self.open = 0
        self.streaming = 0
        self.peak_open = 0
        self.peak_streaming = 0


class StreamProtocol(asyncio.Protocol):
    def __init__(
        self, request: bytes, started: float, stats: Stats, done: asyncio.Future[Any]
    ) -> None:
        self.request = request
        self.started = started
        self.stats = stats
        self.done = done
        self.parts: list[bytes] = []
        self.first: float | None = None
        self.tail = b""

    def connection_made(self, transport: Any) -> None:
        stats = self.stats
        stats.open += 1
        if stats.open > stats.peak_open:
            stats.peak_open = stats.open
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parts.append(data)
        if self.first is None and b"data:" in self.tail + data:
            self.first = time.perf_counter()
            stats = self.stats
            stats.streaming += 1
            if stats.streaming > stats.peak_streaming:
                stats.peak_streaming = stats.streaming
        if self.first is None:
            self.tail = (self.tail + data)[-8:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.open -= 1
        if self.first is not None:
            self.stats.streaming -= 1
        if not self.done.done():
            self.done.set_result((time.perf_counter(), exc))


async def one_stream(
    host: str, port: int, request: bytes, chunks: int, timeout: float, stats: Stats
) -> tuple[str | None, float, float]:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    done: asyncio.Future[Any] = loop.create_future()
    transport = None
    try:
        transport, protocol = await asyncio.wait_for(
            loop.create_connection(
                lambda: StreamProtocol(request, started, stats, done), host, port
            ),
            timeout,
        )
        ended, exc = await asyncio.wait_for(
            done, timeout - (time.perf_counter() - started)
        )
    except asyncio.TimeoutError:
        if transport is not None:
            transport.abort()
        return "timeout", 0.0, 0.0
    except OSError as e:
        return type(e).__name__ + (f"[{e.errno}]" if e.errno else ""), 0.0, 0.0
    body = b"".join(protocol.parts)
    if not body.startswith(b"HTTP/1.1 200"):
        return "status " + body[9:12].decode("latin-1", "replace"), 0.0, 0.0
    if body.count(b"data: ") != chunks + 1 or b"data: [DONE]" not in body:
        return "short stream" if exc is None else "broken stream", 0.0, 0.0
    assert protocol.first is not None
    return None, protocol.first - started, ended - started


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))]


async def run_round(
    options: Any, stats: Stats
) -> list[tuple[str | None, float, float]]:
    request = (
        f"POST {options.path}?chunks={options.chunks}&delay={options.delay} HTTP/1.1\r\n"
        f"Host: {options.host}:{options.port}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: text/event-stream\r\n"
        f"Content-Length: {len(BODY)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + BODY
    tasks = []
    batch = 50
    for i in range(options.streams):
        tasks.append(
            asyncio.ensure_future(
                one_stream(
                    options.host,
                    options.port,
                    request,
                    options.chunks,
                    options.timeout,
                    stats,
                )
            )
        )
        if options.ramp and (i + 1) % batch == 0:
            await asyncio.sleep(batch / options.ramp)
    return list(await asyncio.gather(*tasks))


async def main(options: Any) -> dict[str, Any]:
    stats = Stats()
    for _ in range(options.warmup):
        await run_round(options, stats)
    stats.peak_open = stats.peak_streaming = 0
    results: list[tuple[str | None, float, float]] = []
    started = time.perf_counter()
    for _ in range(options.rounds):
        results.extend(await run_round(options, stats))
    elapsed = time.perf_counter() - started
    errors = Counter(error for error, _, _ in results if error is not None)
    ttfc = [t * 1000 for error, t, _ in results if error is None]
    total = [t * 1000 for error, _, t in results if error is None]
    return {
        "streams": options.streams,
        "rounds": options.rounds,
        "requests": len(results),
        "ok": len(ttfc),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "peak_open": stats.peak_open,
        "peak_streaming": stats.peak_streaming,
        "ttfc_p50_ms": percentile(ttfc, 50),
        "ttfc_p99_ms": percentile(ttfc, 99),
        "ttfc_max_ms": max(ttfc) if ttfc else None,
        "total_p50_ms": percentile(total, 50),
        "total_p99_ms": percentile(total, 99),
        "elapsed_s": elapsed,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/sse/v1/chat/completions")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        help="streams opened per second (0: all at once)",
    )
    parser.add_argument("--timeout", type=float, default=60.0)
    options = parser.parse_args()
    if options.host != "127.0.0.1":
        sys.exit("the benchmark talks to 127.0.0.1 only")
    print(json.dumps(asyncio.run(main(options))))
