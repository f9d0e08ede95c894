# -*- test-case-name: tests.test_usage -*-
"""
Reading OpenAI-style token usage from answers as they pass through.

The proxy never holds a response back to read it.  For a JSON answer the
chunks already written to the client are kept by reference (up to
L{MAX_JSON} bytes) and parsed once the answer is complete; for a stream
only the last L{TAIL} bytes are kept, because the C{usage} object arrives
in the final chunk (when the client asked for
C{stream_options.include_usage}).  Other content types are not looked at,
so non-AI traffic pays one header comparison.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

MAX_JSON = 1024 * 1024
TAIL = 16 * 1024


@attrs.frozen
class Usage:
    """
    Token counts reported by a target.
    """

    model: str | None
    prompt: int
    completion: int
    total: int


def _usage_of(document: Any) -> Usage | None:
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return None

    def count(*names: str) -> int:
        for name in names:
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return 0

    prompt = count("prompt_tokens", "input_tokens")
    completion = count("completion_tokens", "output_tokens")
    total = count("total_tokens") or prompt + completion
    model = document.get("model")
    return Usage(model if isinstance(model, str) else None, prompt, completion, total)


class Sniffer:
    """
    Collects what is needed to read the usage of one answer.
    """

    def __init__(self, stream: bool) -> None:
        self._stream = stream
        self._chunks: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        """
        One more chunk of the answer (already written to the client).
        """
        self._chunks.append(data)
        self._size += len(data)
        if self._stream:
            while len(self._chunks) > 1 and self._size - len(self._chunks[0]) >= TAIL:
                self._size -= len(self._chunks.pop(0))
        elif self._size > MAX_JSON:
            self._chunks = []
            self._stream = True  # too large to parse: stop collecting
            self._size = -(1 << 62)

    def usage(self) -> Usage | None:
        """
        The usage the answer reported, if any.
        """
        body = b"".join(self._chunks)
        if b'"usage"' not in body:
            return None
        if not self._stream:
            try:
                return _usage_of(json.loads(body))
            except ValueError:
                return None
        for line in reversed(body.split(b"\n")):
            line = line.strip()
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    found = _usage_of(json.loads(line[5:]))
                except ValueError:
                    continue
                if found is not None:
                    return found
        return None


def sniffer_for(content_type: bytes) -> Sniffer | None:
    """
    A sniffer for answers that can carry usage, else L{None}.
    """
    if content_type.startswith(b"application/json"):
        return Sniffer(stream=False)
    if content_type.startswith(b"text/event-stream"):
        return Sniffer(stream=True)
    return None
