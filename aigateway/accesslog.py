# -*- test-case-name: tests.test_metrics -*-
"""
The access log: one JSON line per proxied request.

Lines go to a file of their own, so they do not mix with the operational
log.  A finished exchange only hands over a tuple of its fields; every
quarter of a second (or every L{BATCH} requests) the pending records are
formatted together and written to a buffered file, flushed once a second.
Formatting in batches keeps that code warm in the CPU's caches: done once
per request between the proxy's own work it cost twice what a
micro-benchmark of it shows.  A crash loses at most the last second.
"""

from __future__ import annotations

import sys
from json.encoder import encode_basestring_ascii as _quote
from typing import IO, Any

from twisted.internet.task import LoopingCall

BATCH = 1024

Record = tuple[Any, ...]
"""
The fields of one line, in L{_LINE}'s order: start time (epoch seconds),
request id, client IP, method (bytes), path, route, service, upstream name
(or ""), target (or None), status, attempts, targets tried, bytes in,
bytes out, request latency (seconds), upstream latency and proxy latency
(seconds, or None), usage (or None), error (or None), client gone.
"""

# Request ids (hex), methods (HTTP tokens), names (Kong's name characters),
# ids (UUIDs) and target keys (validated host:port) never hold a character
# JSON escapes, so they go in quoted as they are; what a client or a target
# chose (the client IP from X-Forwarded-For, the path, the model, an error
# message) goes through JSON's own escaping.
_LINE = (
    '{"time":%.3f,"request_id":"%s","client_ip":%s,"method":"%s","path":%s,'
    '"route":"%s","service":"%s","upstream":%s,"target":%s,"status":%d,'
    '"attempts":%d,"tried":[%s],"bytes_in":%d,"bytes_out":%d,'
    '"latency_ms":{"request":%.3f,"upstream":%s,"proxy":%s},"tokens":%s,'
    '"error":%s,"client_gone":%s}\n'
)


def line(record: Record) -> str:
    """
    The JSON line of one record (every string through JSON's escaping).
    """
    (
        started,
        request_id,
        client_ip,
        method,
        path,
        route,
        service,
        upstream,
        target,
        status,
        attempts,
        tried,
        bytes_in,
        bytes_out,
        elapsed,
        upstream_latency,
        proxy_latency,
        usage,
        error,
        gone,
    ) = record
    if usage is None:
        tokens = "null"
    else:
        tokens = (
            f'{{"model":{_string(usage.model)},"prompt":{usage.prompt:d},'
            f'"completion":{usage.completion:d},"total":{usage.total:d}}}'
        )
    return _LINE % (
        started,
        request_id,
        _quote(client_ip),
        method.decode("latin-1"),
        _quote(path),
        route,
        service,
        f'"{upstream}"' if upstream else "null",
        f'"{target}"' if target is not None else "null",
        status,
        attempts,
        ",".join([f'"{key}"' for key in tried]),
        bytes_in,
        bytes_out,
        elapsed * 1000,
        _ms(upstream_latency),
        _ms(proxy_latency),
        tokens,
        _string(error),
        "true" if gone else "false",
    )


def _string(value: str | None) -> str:
    return "null" if value is None else _quote(value)


def _ms(seconds: float | None) -> str:
    return "null" if seconds is None else "%.3f" % (seconds * 1000)


class AccessLog:
    """
    Writes records as JSON lines.
    """

    def __init__(self, clock: Any, path: str) -> None:
        self._file: IO[str]
        if path == "-":
            self._file = sys.stdout
            self._close = False
        else:
            self._file = open(path, "a", encoding="utf-8", buffering=64 * 1024)  # noqa: SIM115
            self._close = True
        self._pending: list[Record] = []
        self._clock = clock
        self._flushed = clock.seconds()
        self._flusher = LoopingCall(self._tick)
        self._flusher.clock = clock
        self._flusher.start(0.25, now=False)

    def write(self, record: Record) -> None:
        """
        Log one request.
        """
        pending = self._pending
        pending.append(record)
        if len(pending) >= BATCH:
            self._format()

    def _format(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            self._file.write("".join(map(line, pending)))

    def _tick(self) -> None:
        self._format()
        now = self._clock.seconds()
        if now - self._flushed >= 1.0:
            self._flushed = now
            self._file.flush()

    def flush(self) -> None:
        """
        Push every pending line to the file.
        """
        self._format()
        self._file.flush()

    def close(self) -> None:
        """
        Flush and stop.
        """
        if self._flusher.running:
            self._flusher.stop()
        self.flush()
        if self._close:
            self._file.close()
