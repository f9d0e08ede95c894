# -*- test-case-name: tests.test_metrics -*-
"""
The access log: one JSON line per proxied request.

Lines are emitted through C{twisted.logger} to an observer of their own, so
they do not mix with the operational log, and are written to a buffered
file flushed once a second: the exchange that finished pays for a
C{json.dumps} and a buffered write, not a system call.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

# json.dumps with arguments builds a new encoder on every call.
_encode = json.JSONEncoder(separators=(",", ":")).encode


@implementer(ILogObserver)
class AccessLog:
    """
    Writes C{record} events as JSON lines.
    """

    def __init__(self, clock: Any, path: str) -> None:
        self._file: IO[str]
        if path == "-":
            self._file = sys.stdout
            self._close = False
        else:
            self._file = open(path, "a", encoding="utf-8", buffering=64 * 1024)  # noqa: SIM115
            self._close = True
        self.log = Logger(namespace="aigateway.access", observer=self)
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = clock
        self._flusher.start(1.0, now=False)

    def __call__(self, event: dict[str, Any]) -> None:
        record = event.get("record")
        if record is not None:
            self._file.write(_encode(record) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        """
        Log one request.
        """
        self.log.info("{record}", record=record)

    def flush(self) -> None:
        """
        Push buffered lines to the file.
        """
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
