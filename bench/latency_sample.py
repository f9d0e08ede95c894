"""
Samples the gateway's own latency headers: sends a few hundred chat
requests one after another on one keep-alive connection and reports the
distribution of ``X-Proxy-Latency`` (time the gateway spent before sending
upstream, whole milliseconds), ``X-Upstream-Latency`` and the latency the
client saw.

Usage: python bench/latency_sample.py --port 8000 [--count 500]
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import time
from collections import Counter

BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write one sentence about load balancers."},
        ],
        "temperature": 0.2,
        "max_tokens": 64,
    }
).encode()


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--path", default="/v1/chat/completions")
    options = parser.parse_args()
    connection = http.client.HTTPConnection("127.0.0.1", options.port, timeout=10)
    proxy: list[float] = []
    upstream: list[float] = []
    seen: list[float] = []
    errors = 0
    for _ in range(options.count):
        started = time.perf_counter()
        connection.request(
            "POST", options.path, BODY, {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        response.read()
        seen.append((time.perf_counter() - started) * 1000)
        if response.status != 200:
            errors += 1
            continue
        value = response.getheader("X-Proxy-Latency")
        if value is not None:
            proxy.append(float(value))
        value = response.getheader("X-Upstream-Latency")
        if value is not None:
            upstream.append(float(value))
    connection.close()
    print(
        json.dumps(
            {
                "count": options.count,
                "errors": errors,
                "proxy_latency_ms": {
                    "p50": percentile(proxy, 50),
                    "p99": percentile(proxy, 99),
                    "max": max(proxy) if proxy else None,
                    "histogram": {
                        str(int(k)): v for k, v in sorted(Counter(proxy).items())
                    },
                },
                "upstream_latency_ms": {
                    "p50": percentile(upstream, 50),
                    "p99": percentile(upstream, 99),
                },
                "client_ms": {"p50": percentile(seen, 50), "p99": percentile(seen, 99)},
            }
        )
    )


if __name__ == "__main__":
    main()
