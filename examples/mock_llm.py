"""
A small OpenAI-style model server, for trying aigateway without a provider.

    python examples/mock_llm.py --port 9001 --name alpha

It answers C{POST /v1/chat/completions} (JSON, or server-sent events when
the body says C{"stream": true}, with a final C{usage} chunk when it asks
for C{stream_options.include_usage}), C{GET /v1/models} and
C{GET /health}.  C{--status 503} makes it fail, C{--chunk-delay} paces the
stream, so balancing and health checks can be watched on one machine.
"""

from __future__ import annotations

import argparse
import json
import time

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site


class MockLLM(Resource):
    isLeaf = True

    def __init__(self, name: str, status: int, chunks: int, delay: float) -> None:
        super().__init__()
        self.name = name
        self.status = status
        self.chunks = chunks
        self.delay = delay

    def render(self, request):  # type: ignore[no-untyped-def]
        request.setHeader(b"x-served-by", self.name.encode())
        if request.path == b"/health":
            request.setResponseCode(self.status)
            return b"ok" if self.status == 200 else b"failing"
        if self.status != 200:
            request.setResponseCode(self.status)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(
                {"error": {"message": f"{self.name} is failing"}}
            ).encode()
        if request.path == b"/v1/models":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"data": [{"id": "mock-1", "object": "model"}]}).encode()
        try:
            body = json.loads(request.content.read() or b"{}")
        except ValueError:
            body = {}
        model = body.get("model", "mock-1")
        if body.get("stream"):
            usage = (body.get("stream_options") or {}).get("include_usage", False)
            self._stream(request, model, usage)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {
                "id": "chatcmpl-mock",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": f"Hello from {self.name}.",
                        },
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 9,
                    "completion_tokens": 4,
                    "total_tokens": 13,
                },
            }
        ).encode()

    def _stream(self, request, model: str, usage: bool) -> None:  # type: ignore[no-untyped-def]
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")

        def send(n: int) -> None:
            if request._disconnected:
                return
            if n < self.chunks:
                delta = {"content": f"{self.name}-{n} "}
                chunk = {
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": delta}],
                }
                request.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                reactor.callLater(self.delay, send, n + 1)
                return
            if usage:
                final = {
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 9,
                        "completion_tokens": self.chunks,
                        "total_tokens": 9 + self.chunks,
                    },
                }
                request.write(b"data: " + json.dumps(final).encode() + b"\n\n")
            request.write(b"data: [DONE]\n\n")
            request.finish()

        send(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--name", default="mock")
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--chunk-delay", type=float, default=0.2)
    args = parser.parse_args()
    resource = MockLLM(args.name, args.status, args.chunks, args.chunk_delay)
    reactor.listenTCP(args.port, Site(resource), interface="127.0.0.1")
    print(f"mock LLM {args.name!r} on http://127.0.0.1:{args.port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
