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
import re

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


# JSON escapes every quote inside a string, so these cannot match text
# inside a message's content: only real keys.  A regular expression over the
# bytes costs a fraction of json.loads on a whole answer.
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
# Each count is found with bytes.find and read with an anchored match: a
# single alternation scanned over the object cost twice as much.
_KEYS = (
    (b'"prompt_tokens"', "prompt"),
    (b'"input_tokens"', "prompt"),
    (b'"completion_tokens"', "completion"),
    (b'"output_tokens"', "completion"),
    (b'"total_tokens"', "total"),
)
_NUMBER = re.compile(rb"\s*:\s*(\d+)")
# OpenAI's own layout (prompt, completion, total, in that order, first in
# the object) read in the same match as the key; anything else goes the
# general way.
_OPENAI = re.compile(
    rb'"usage"\s*:\s*\{\s*"prompt_tokens"\s*:\s*(\d+)\s*,\s*"completion_tokens"'
    rb'\s*:\s*(\d+)\s*,\s*"total_tokens"\s*:\s*(\d+)'
)
# A model name without escapes (all of them in practice) is matched by one
# character-class run, which the regular expression engine does in a tight
# loop; the alternation that allows escapes, tried only when that fails,
# steps through the name one character at a time (twice the cost).
# (Escaped, a name takes up to 12 bytes a character: room for 80.)
_MODEL = re.compile(rb'"model"\s*:\s*("[^"\\]{1,200}"|"(?:[^"\\]|\\.){1,1000}")')
_WINDOW = 1024


def _string(token: bytes) -> str | None:
    if token.find(b"\\") < 0:  # (not "in": see proxy._parser)
        # Nothing escaped (model names never are): no JSON decoder needed.
        return token[1:-1].decode("utf-8", "replace")
    try:
        value = json.loads(token)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def scan(document: bytes) -> Usage | None:
    """
    The last C{usage} object of a JSON document or event stream, and the
    C{model} of the same answer (or event).
    """
    position = document.rfind(b'"usage"')
    while position >= 0:
        openai = _OPENAI.match(document, position)
        if openai is not None:
            prompt, completion, total = map(int, openai.groups())
            break
        last = _USAGE.match(document, position)
        if last is not None:
            prompt, completion, total = _counts(document, last.end())
            break
        # "usage": null, as every event but the last of a stream has it.
        position = document.rfind(b'"usage"', 0, position)
    else:
        return None
    # In a stream the model is in the same event; in a document, anywhere.
    line = document.rfind(b"\n", 0, position) + 1
    model = _MODEL.search(document, line) or _MODEL.search(document)
    return Usage(_string(model.group(1)) if model else None, prompt, completion, total)


def _counts(document: bytes, start: int) -> tuple[int, int, int]:
    """
    The prompt, completion and total counts of the usage object that
    opens at C{start}, whatever their names (OpenAI's or Anthropic's) and
    order.
    """
    counts: dict[str, int] = {}
    end = start + _WINDOW
    for key, name in _KEYS:
        if name not in counts:
            found = document.find(key, start, end)
            if found >= 0:
                number = _NUMBER.match(document, found + len(key), end)
                if number is not None:
                    counts[name] = int(number.group(1))
    prompt, completion = counts.get("prompt", 0), counts.get("completion", 0)
    return prompt, completion, counts.get("total", prompt + completion)


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
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if body.find(b'"usage"') < 0:  # (not "in": see proxy._parser)
            return None
        return scan(body)


def sniffer_for(content_type: bytes) -> Sniffer | None:
    """
    A sniffer for answers that can carry usage, else L{None}.
    """
    if content_type.startswith(b"application/json"):
        return Sniffer(stream=False)
    if content_type.startswith(b"text/event-stream"):
        return Sniffer(stream=True)
    return None
