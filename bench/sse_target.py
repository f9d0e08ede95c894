"""
A streaming target for the benchmark: a Twisted server that answers every
request (any method, any path) with an OpenAI-style server-sent-event
stream, and ``GET /health`` with ``ok``.

The first chunk is written as soon as the request arrives (so the time to
first chunk measures the path, not the target), then one chunk every
``delay`` seconds until ``chunks`` chunks were sent, followed by
``data: [DONE]``.  Both come from the query string (``?chunks=20&delay=0.02``)
or default to the command-line values.

Usage: python bench/sse_target.py --port 18003 [--chunks 20] [--delay 0.02]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site


def chunk(index: int) -> bytes:
    event = {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "delta": {"content": f"tok{index} "}, "finish_reason": None}
        ],
    }
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


class _Stream:
    def __init__(self, request: Any, chunks: int, delay: float) -> None:
        self.request = request
        self.left = chunks
        self.delay = delay
        self.index = 0
        self.call: Any = None
        self.gone = False
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, _: object) -> None:
        self.gone = True
        if self.call is not None and self.call.active():
            self.call.cancel()

    def send(self) -> None:
        self.call = None
        if self.gone:
            return
        data = chunk(self.index)
        self.index += 1
        self.left -= 1
        if self.left <= 0:
            self.request.write(data + b"data: [DONE]\n\n")
            self.request.finish()
            return
        self.request.write(data)
        self.call = reactor.callLater(self.delay, self.send)


class StreamResource(Resource):
    isLeaf = True

    def __init__(self, chunks: int, delay: float) -> None:
        super().__init__()
        self.chunks = chunks
        self.delay = delay

    def render(self, request: Any) -> Any:
        if request.path == b"/health":
            request.setHeader(b"content-type", b"text/plain")
            return b"ok"
        args = request.args
        chunks = int(args.get(b"chunks", [self.chunks])[0])
        delay = float(args.get(b"delay", [self.delay])[0])
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.channel.transport.setTcpNoDelay(True)
        _Stream(request, max(chunks, 1), delay).send()
        return NOT_DONE_YET


class QuietSite(Site):
    def log(self, request: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--backlog", type=int, default=4096)
    options = parser.parse_args()
    site = QuietSite(StreamResource(options.chunks, options.delay))
    site.timeOut = None  # slow streams must not be cut by the idle timeout
    reactor.listenTCP(
        options.port, site, backlog=options.backlog, interface="127.0.0.1"
    )
    reactor.run()


if __name__ == "__main__":
    main()
