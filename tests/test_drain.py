"""
Stopping a node drains it: the listener goes at once, idle connections
close, answers in progress (streams included) finish, and what outlives
the drain timeout is cut.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol

from .gatewaykit import Gateway, SSEResource, direct_route, wait_for
from .test_server import connect


async def _streaming_node(
    tmp_path: Any, servers: list[Any], sse: SSEResource, **settings: Any
) -> Gateway:
    node = await Gateway(str(tmp_path / "drain.db"), **settings).start()
    await direct_route(node, servers, sse, **{"paths[]": "/"})
    return node


async def _stream(node: Gateway) -> Any:
    conversation = await connect(node.service.proxy_port.getHost().port)
    conversation.transport.write(b"GET /v1/chat HTTP/1.1\r\nHost: a\r\n\r\n")
    await conversation.until(b"token0")
    return conversation


@pytest_twisted.ensureDeferred
async def test_a_stopping_node_finishes_its_streams(tmp_path, servers):
    sse = SSEResource(count=8, interval=0.1)
    node = await _streaming_node(tmp_path, servers, sse)
    port = node.service.proxy_port.getHost().port
    idle = await connect(port)
    idle.transport.write(b"GET /v1/chat HTTP/1.1\r\nHost: a\r\n\r\n")
    await idle.until(b"0\r\n\r\n")  # answered; now an idle keep-alive
    stream = await _stream(node)

    service = node.service
    stopped = Deferred.fromCoroutine(node.stop())
    await wait_for(lambda: _true(not service.running), 2, 0.01)
    # The listener is gone at once...
    with pytest.raises(ConnectionRefusedError):
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol()
        )
    # ...the idle connection is closed...
    await wait_for(lambda: _true(idle.is_closed), 2, 0.01)
    assert not stream.is_closed and not stopped.called
    # ...and the stream runs to its end, whole, before the node stops.
    await stopped
    assert stream.data.count(b"token") == 8
    assert b"[DONE]" in stream.data and stream.data.endswith(b"0\r\n\r\n")
    # (Its head had gone out before the drain: the connection is closed
    # after the answer rather than announced as closing.)
    await wait_for(lambda: _true(stream.is_closed), 2, 0.01)


@pytest_twisted.ensureDeferred
async def test_a_stream_outliving_the_drain_timeout_is_cut(tmp_path, servers):
    sse = SSEResource(count=1000, interval=0.05)
    node = await _streaming_node(tmp_path, servers, sse, drain_timeout=0.3)
    stream = await _stream(node)
    began = reactor.seconds()
    await node.stop()
    took = reactor.seconds() - began
    assert 0.3 <= took < 3, took
    await wait_for(lambda: _true(stream.is_closed), 2, 0.01)
    assert not stream.data.endswith(b"0\r\n\r\n")


async def _true(value: bool) -> bool:
    return value
