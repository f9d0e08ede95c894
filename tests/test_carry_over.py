"""
Balancer state across configuration changes, end to end: a real gateway,
real targets on 127.0.0.1 that hold their answers, every request through
the proxy listener.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from .gatewaykit import Gateway, Reply, address, hold_targets, wait_for


@pytest_twisted.ensureDeferred
async def test_least_connections_remembers_streams(
    gateway: Gateway, servers: list[Any]
) -> None:
    """
    Twenty requests held open on alpha (beta at weight 0), then beta given
    weight 100: the next ten requests all go to beta, as alpha is still
    busy.  Once all thirty are answered, the balancer in force counts
    none in flight on either (alpha's twenty ended on the balancer they
    began on): four more requests split two and two.
    """
    arrivals: list[str] = []
    resources, ports = hold_targets(servers, ["alpha", "beta"], arrivals)
    for resource in resources.values():
        resource.holding = True
    alpha, beta = address(ports["alpha"]), address(ports["beta"])
    await gateway.configure("lc", {alpha: 100, beta: 0}, algorithm="least-connections")

    def send(count: int) -> list[Deferred[Reply]]:
        return [Deferred.fromCoroutine(gateway.proxy.get("/")) for _ in range(count)]

    async def arrived(count: int) -> None:
        async def check() -> bool:
            return len(arrivals) == count

        await wait_for(check, 5)

    pending = send(20)
    await arrived(20)
    reply = await gateway.admin.patch(
        f"/upstreams/lc/targets/{beta}", form={"weight": "100"}
    )
    assert reply.code == 200, reply.body
    pending += send(10)
    await arrived(30)
    assert Counter(arrivals) == {"alpha": 20, "beta": 10}, arrivals

    for resource in resources.values():
        resource.release()
    replies = await gatherResults(pending)
    assert [r.code for r in replies] == [200] * 30
    for resource in resources.values():
        resource.holding = True
    pending = send(4)
    await arrived(34)
    assert Counter(arrivals[30:]) == {"alpha": 2, "beta": 2}, arrivals[30:]
    for resource in resources.values():
        resource.release()
    assert [r.code for r in await gatherResults(pending)] == [200] * 4
