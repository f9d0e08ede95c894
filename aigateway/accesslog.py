# -*- test-case-name: tests.test_metrics -*-
"""
The access log: one JSON line per proxied request.

Lines go to a file of their own, so they do not mix with the operational
log, buffered and flushed once a second: the exchange that finished pays
for formatting its line and a buffered write, not a system call.  They bypass
C{twisted.logger}, whose event dictionary and observer fan-out per line
cost as much as the encoding.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.internet.task import LoopingCall


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
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = clock
        self._flusher.start(1.0, now=False)

    def write(self, line: str) -> None:
        """
        Log one request: C{line} is its JSON object and a newline.
        """
        self._file.write(line)

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
