"""
Health checks end to end (issue 4): a real gateway probing and proxying to
real target servers on 127.0.0.1, on the real clock.

Waits poll every 0.1 s up to the bound the issue states, so a test takes
about as long as the behaviour it shows, and fails when that is too long.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet._resolver import HostResolution
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver
from twisted.web.client import ResponseFailed
from zope.interface import implementer

from .gatewaykit import (
    HoldingTarget,
    SSEResource,
    address,
    bounded,
    health_of,
    hold_targets,
    kill,
    listen,
    listen_killable,
    sample,
    scrape,
    sleep,
    wait_for,
)

HEALTH = "aigateway_upstream_target_health"
ATTEMPTS = "aigateway_upstream_target_requests_total"


def start_targets(servers, names, killable=False):
    """
    A L{HoldingTarget} per name, listening; returns C{(resources, ports,
    keys)} keyed by name (C{keys}: the C{host:port} target strings).
    """
    resources, ports = hold_targets(servers, names, killable=killable)
    return resources, ports, {name: address(p) for name, p in ports.items()}


async def spread(gateway, count, concurrency=10, path="/"):
    """
    C{count} GETs through the proxy, all of which must succeed, counted by
    the target that answered.
    """

    async def one(i):
        reply = await gateway.proxy.get(path)
        assert reply.code == 200, (reply.code, reply.body)
        return reply.body.decode()

    return Counter(await bounded(count, concurrency, one))


def is_state(gateway, upstream, key, state):
    """
    A check for L{wait_for}: C{key}'s health is C{state}.
    """

    async def check():
        return (await health_of(gateway, upstream)).get(key) == state

    return check


def series(samples, upstream, key):
    """
    The state whose C{aigateway_upstream_target_health} series is 1.
    """
    states = [
        state
        for state in ("healthy", "unhealthy", "healthchecks_off", "dns_error")
        if sample(samples, HEALTH, upstream=upstream, target=key, state=state) == 1
    ]
    assert len(states) == 1, states
    return states[0]


async def attempts(gateway, upstream, key):
    """
    Every attempt the proxy made on C{key}, whatever its outcome.
    """
    samples = await scrape(gateway)
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == ATTEMPTS
        and ("upstream", upstream) in labels
        and ("target", key) in labels
    )


@pytest_twisted.ensureDeferred
async def test_active_checks_take_a_dead_target_out_and_back(gateway, servers):
    """
    Three targets, active checks every 1 s with the default thresholds
    (2 TCP failures, 2 successes).  One target dies (listener closed, its
    connections aborted): within 2 x 1 s + 1 s it is UNHEALTHY in the
    health endpoint and the metrics, and 30 requests make no attempt on
    it.  It listens again on the same port: within 2 x 1 s + 1 s it is
    HEALTHY and gets its share of traffic again.
    """
    resources, ports, keys = start_targets(servers, ["a", "b", "c"], killable=True)
    await gateway.configure("checked", {key: 100 for key in keys.values()})
    reply = await gateway.admin.patch(
        "/upstreams/checked",
        form={
            "healthchecks.active.healthy.interval": "1",
            "healthchecks.active.unhealthy.interval": "1",
        },
    )
    assert reply.code == 200, reply.body
    assert reply.json["healthchecks"]["active"]["unhealthy"]["tcp_failures"] == 2
    assert reply.json["healthchecks"]["active"]["healthy"]["successes"] == 2
    assert await health_of(gateway, "checked") == dict.fromkeys(
        keys.values(), "HEALTHY"
    )
    assert await spread(gateway, 30) == Counter({"a": 10, "b": 10, "c": 10})

    c = keys["c"]
    await kill(ports["c"], servers)
    took = await wait_for(is_state(gateway, "checked", c, "UNHEALTHY"), 2 * 1 + 1)
    assert took >= 0.9  # two probes, 1 s apart, were needed
    assert series(await scrape(gateway), "checked", c) == "unhealthy"
    before = await attempts(gateway, "checked", c)
    seen = await spread(gateway, 30)
    assert set(seen) == {"a", "b"} and sum(seen.values()) == 30, seen
    assert await attempts(gateway, "checked", c) == before

    servers.append(listen_killable(resources["c"], int(c.rsplit(":", 1)[1])))
    took = await wait_for(is_state(gateway, "checked", c, "HEALTHY"), 2 * 1 + 1)
    assert took >= 0.9
    assert series(await scrape(gateway), "checked", c) == "healthy"
    assert resources["c"].hits["/"] >= 10 + 2  # its traffic, and two probes
    hits = resources["c"].hits["/"]
    seen = await spread(gateway, 30)
    assert seen["c"] >= 8, seen
    assert resources["c"].hits["/"] >= hits + seen["c"]


@pytest_twisted.ensureDeferred
async def test_passive_checks_and_cooldown(gateway, servers):
    """
    Passive checks only (C{http_failures=3}, C{cooldown=1}): a target
    answering 500 is UNHEALTHY after exactly 3 proxied 500s, which the
    clients never see (the service retries 500 on another target by
    default: every request answers 200).  It is then skipped: 20 requests
    within the cooldown make no attempt on it.  Still failing after the
    cooldown, it gets exactly one trial request, which fails and restarts
    the cooldown.  Answering 200 again, its next trial makes it HEALTHY,
    and it gets its share.
    """
    resources, ports, keys = start_targets(servers, ["a", "b", "c"])
    await gateway.configure("passive", {key: 100 for key in keys.values()})
    reply = await gateway.admin.patch(
        "/upstreams/passive",
        form={
            "healthchecks.passive.unhealthy.http_failures": "3",
            "healthchecks.passive.unhealthy.cooldown": "1",
        },
    )
    assert reply.code == 200, reply.body
    c = keys["c"]
    resources["c"].status = 500

    seen = await spread(gateway, 12, concurrency=1)
    assert set(seen) == {"a", "b"} and sum(seen.values()) == 12, seen
    assert resources["c"].hits["/"] == 3
    assert (await health_of(gateway, "passive"))[c] == "UNHEALTHY"
    failed_at = reactor.seconds()
    assert series(await scrape(gateway), "passive", c) == "unhealthy"

    await spread(gateway, 20, concurrency=1)
    assert resources["c"].hits["/"] == 3
    assert reactor.seconds() - failed_at < 1, "too slow to show the cooldown"

    await sleep(1.1 - (reactor.seconds() - failed_at))
    await spread(gateway, 20, concurrency=1)
    assert resources["c"].hits["/"] == 4  # one trial, a 500 again
    trial_at = reactor.seconds()
    assert (await health_of(gateway, "passive"))[c] == "UNHEALTHY"

    resources["c"].status = 200
    await spread(gateway, 10, concurrency=1)
    assert resources["c"].hits["/"] == 4, "a trial before the cooldown restarted"
    await sleep(1.1 - (reactor.seconds() - trial_at))
    await spread(gateway, 3, concurrency=1)
    assert resources["c"].hits["/"] == 5
    assert (await health_of(gateway, "passive"))[c] == "HEALTHY"
    assert series(await scrape(gateway), "passive", c) == "healthy"
    seen = await spread(gateway, 30, concurrency=1)
    assert seen["c"] >= 8, seen


@pytest_twisted.ensureDeferred
async def test_retry_after_429_cools_a_target_down(gateway, servers):
    """
    A target answering 429 with C{Retry-After: 2} (passive checks on,
    C{http_failures=1}, which a rate limit must not trip): the client
    gets 200 from another target; requests sent every 20 ms for the next
    ~2 s never reach it, while the health endpoint shows it HEALTHY with a
    C{cooldown_until}; then (it now answers 200) it is used again, 1.9 to
    2.5 s after the 429.
    """
    resources, ports, keys = start_targets(servers, ["a", "b", "c"])
    await gateway.configure("limited", {key: 100 for key in keys.values()})
    await gateway.admin.patch(
        "/upstreams/limited", form={"healthchecks.passive.unhealthy.http_failures": "1"}
    )
    c = keys["c"]
    resources["c"].status = 429
    resources["c"].headers = {b"retry-after": b"2"}

    while resources["c"].hits["/"] == 0:
        reply = await gateway.proxy.get("/")
        assert reply.code == 200 and reply.body in (b"a", b"b")
    limited_at = reactor.seconds()
    resources["c"].status = 200
    resources["c"].headers = {}

    rows = (await gateway.admin.get("/upstreams/limited/health")).json["data"]
    row = next(r for r in rows if r["target"] == c)
    assert row["health"] == "HEALTHY"
    assert row["cooldown_until"] is not None
    assert abs(row["cooldown_until"] - (limited_at + 2)) < 0.5

    sent = 0
    while resources["c"].hits["/"] == 1:
        assert reactor.seconds() - limited_at < 3, "never used again"
        reply = await gateway.proxy.get("/")
        assert reply.code == 200
        sent += 1
        await sleep(0.02)
    back_after = reactor.seconds() - limited_at
    assert 1.9 <= back_after <= 2.5, back_after
    assert sent >= 30
    assert (await health_of(gateway, "limited"))[c] == "HEALTHY"


async def doc_upstream(gateway, servers):
    """
    The Load Balancing doc's C{ai-upstream} (round-robin) with targets
    C{a} and C{b} and a route to it.
    """
    resources, ports, keys = start_targets(servers, ["a", "b"])
    reply = await gateway.admin.post(
        "/upstreams", form={"name": "ai-upstream", "algorithm": "round-robin"}
    )
    assert reply.code == 201, reply.body
    for key in keys.values():
        reply = await gateway.admin.post(
            "/upstreams/ai-upstream/targets", form={"target": key, "weight": "100"}
        )
        assert reply.code == 201, reply.body
    await gateway.admin.post("/services", form={"name": "ai", "host": "ai-upstream"})
    await gateway.admin.post("/services/ai/routes", form={"paths[]": "/"})
    return resources, keys


def doc_active_patch(interval):
    """
    The doc's active-checks PATCH body, in its order, with C{interval}.
    """
    return [
        ("healthchecks.active.http_path", "/health"),
        ("healthchecks.active.healthy.interval", interval),
        ("healthchecks.active.unhealthy.interval", interval),
    ]


@pytest_twisted.ensureDeferred
async def test_load_balancing_doc_commands_exactly(gateway, servers):
    """
    The doc's two PATCH commands, verbatim (interval 5), on a running
    gateway: the targets go from HEALTHCHECKS_OFF to HEALTHY at once, a
    target answering 500 is UNHEALTHY after the passive command's 3
    proxied failures (clients still get 200), and within 5 s (+1 s) of
    the PATCH both targets' C{/health} is probed, with the Host the proxy
    would send.
    """
    resources, keys = await doc_upstream(gateway, servers)
    assert await health_of(gateway, "ai-upstream") == dict.fromkeys(
        keys.values(), "HEALTHCHECKS_OFF"
    )
    reply = await gateway.admin.patch(
        "/upstreams/ai-upstream", form=doc_active_patch("5")
    )
    assert reply.code == 200, reply.body
    patched_at = reactor.seconds()
    active = reply.json["healthchecks"]["active"]
    assert active["http_path"] == "/health"
    assert active["healthy"]["interval"] == active["unhealthy"]["interval"] == 5
    assert await health_of(gateway, "ai-upstream") == dict.fromkeys(
        keys.values(), "HEALTHY"
    )

    reply = await gateway.admin.patch(
        "/upstreams/ai-upstream",
        form=[
            ("healthchecks.passive.healthy.successes", "3"),
            ("healthchecks.passive.unhealthy.http_failures", "3"),
        ],
    )
    assert reply.code == 200, reply.body
    assert reply.json["healthchecks"]["active"]["http_path"] == "/health"  # deep merge
    resources["b"].statuses["/"] = 500
    seen = await spread(gateway, 10, concurrency=1)
    assert seen == Counter({"a": 10})
    assert resources["b"].hits["/"] == 3
    assert (await health_of(gateway, "ai-upstream"))[keys["b"]] == "UNHEALTHY"

    async def probed():
        return all(r.hits["/health"] for r in resources.values())

    await sleep(max(0.0, 4.8 - (reactor.seconds() - patched_at)))
    assert not any(r.hits["/health"] for r in resources.values()), "probed before 5 s"
    await wait_for(probed, 5 + 1 - (reactor.seconds() - patched_at))
    probe = next(r for r in resources["a"].requests if r["uri"] == b"/health")
    assert probe["method"] == b"GET"
    assert probe["headers"].getRawHeaders(b"host") == [keys["a"].encode()]


@pytest_twisted.ensureDeferred
async def test_load_balancing_doc_commands_at_one_second(gateway, servers):
    """
    The doc's active command with interval 1: a target whose C{/health}
    answers 500 (its C{/} still fine) is UNHEALTHY within 2 x 1 s (+1 s)
    (active C{http_failures} 2) and gets no proxied request; when
    C{/health} answers 200 again it is HEALTHY within 2 x 1 s (+1 s) and
    is used again.  Then C{interval=0} stops the probes.
    """
    resources, keys = await doc_upstream(gateway, servers)
    resources["b"].statuses["/health"] = 500
    reply = await gateway.admin.patch(
        "/upstreams/ai-upstream", form=doc_active_patch("1")
    )
    assert reply.code == 200, reply.body
    b = keys["b"]
    await wait_for(is_state(gateway, "ai-upstream", b, "UNHEALTHY"), 2 * 1 + 1)
    served = resources["b"].hits["/"]
    assert await spread(gateway, 20, concurrency=1) == Counter({"a": 20})
    assert resources["b"].hits["/"] == served

    del resources["b"].statuses["/health"]
    await wait_for(is_state(gateway, "ai-upstream", b, "HEALTHY"), 2 * 1 + 1)
    assert await spread(gateway, 20, concurrency=1) == Counter({"a": 10, "b": 10})

    reply = await gateway.admin.patch(
        "/upstreams/ai-upstream",
        form={
            "healthchecks.active.healthy.interval": "0",
            "healthchecks.active.unhealthy.interval": "0",
        },
    )
    assert reply.code == 200
    probes = {name: r.hits["/health"] for name, r in resources.items()}
    await sleep(1.3)
    assert {name: r.hits["/health"] for name, r in resources.items()} == probes
    assert await health_of(gateway, "ai-upstream") == dict.fromkeys(
        keys.values(), "HEALTHCHECKS_OFF"
    )


@pytest_twisted.ensureDeferred
async def test_deleting_stops_probes(gateway, servers):
    """
    Active checks every 0.2 s: deleting a target stops its probes at once,
    deleting the upstream stops the others.
    """
    resources, keys = await doc_upstream(gateway, servers)
    reply = await gateway.admin.patch(
        "/upstreams/ai-upstream", form=doc_active_patch("0.2")
    )
    assert reply.code == 200, reply.body

    async def probed_twice():
        return all(r.hits["/health"] >= 2 for r in resources.values())

    await wait_for(probed_twice, 1)
    assert (
        await gateway.admin.delete(f"/upstreams/ai-upstream/targets/{keys['b']}")
    ).code == 204
    b_probes = resources["b"].hits["/health"]
    await sleep(0.5)
    assert resources["b"].hits["/health"] == b_probes
    assert resources["a"].hits["/health"] >= 3

    assert (await gateway.admin.delete("/upstreams/ai-upstream")).code == 204
    a_probes = resources["a"].hits["/health"]
    await sleep(0.5)
    assert resources["a"].hits["/health"] == a_probes


@pytest_twisted.ensureDeferred
async def test_health_set_by_hand(gateway, servers):
    """
    C{PUT .../unhealthy} and C{.../healthy} (POST works too) on an
    upstream with passive checks: the state shows in C{/health}, in the
    C{aigateway_upstream_target_health} series and in traffic;
    C{?balancer_health=1} gives the upstream's overall health and the
    available weight.  On an upstream without checks, C{unhealthy} takes
    a target out too, and C{healthy} puts it back as HEALTHCHECKS_OFF.
    An unknown target is a 404.
    """
    resources, ports, keys = start_targets(servers, ["a", "b"])
    a, b = keys["a"], keys["b"]
    await gateway.configure(
        "manual",
        {a: 100, b: 100},
        **{"healthchecks.passive.unhealthy.http_failures": "5"},
    )

    async def overall():
        reply = await gateway.admin.get("/upstreams/manual/health?balancer_health=1")
        assert reply.code == 200, reply.body
        return reply.json["data"]

    data = await overall()
    assert (data["health"], data["balancer_health"]) == ("HEALTHY", "HEALTHY")
    assert data["details"]["weight"] == {
        "total": 200,
        "available": 200,
        "unavailable": 0,
    }

    assert (
        await gateway.admin.put(f"/upstreams/manual/targets/{a}/unhealthy")
    ).code == 204
    assert await health_of(gateway, "manual") == {a: "UNHEALTHY", b: "HEALTHY"}
    samples = await scrape(gateway)
    assert (series(samples, "manual", a), series(samples, "manual", b)) == (
        "unhealthy",
        "healthy",
    )
    assert await spread(gateway, 10) == Counter({"b": 10})
    data = await overall()
    assert (data["health"], data["balancer_health"]) == ("HEALTHY", "HEALTHY")
    assert data["details"]["weight"] == {
        "total": 200,
        "available": 100,
        "unavailable": 100,
    }
    rows = (await gateway.admin.get("/upstreams/manual/health")).json["data"]
    row = next(r for r in rows if r["target"] == a)
    assert row["data"]["weight"] == {"total": 100, "available": 0, "unavailable": 100}
    assert row["data"]["addresses"][0]["health"] == "UNHEALTHY"

    assert (
        await gateway.admin.put(f"/upstreams/manual/targets/{b}/unhealthy")
    ).code == 204
    reply = await gateway.proxy.get("/")
    assert reply.code == 503
    assert reply.json["message"] == "failure to get a peer from the ring-balancer"
    data = await overall()
    assert (data["health"], data["balancer_health"]) == ("UNHEALTHY", "UNHEALTHY")

    assert (
        await gateway.admin.post(f"/upstreams/manual/targets/{a}/healthy")
    ).code == 204
    assert await health_of(gateway, "manual") == {a: "HEALTHY", b: "UNHEALTHY"}
    assert series(await scrape(gateway), "manual", a) == "healthy"
    assert await spread(gateway, 10) == Counter({"a": 10})

    reply = await gateway.admin.put("/upstreams/manual/targets/127.0.0.1:1/healthy")
    assert reply.code == 404

    await gateway.configure("unchecked", {a: 100, b: 100})
    assert (
        await gateway.admin.put(f"/upstreams/unchecked/targets/{a}/unhealthy")
    ).code == 204
    assert await health_of(gateway, "unchecked") == {
        a: "UNHEALTHY",
        b: "HEALTHCHECKS_OFF",
    }
    assert (
        await gateway.admin.put(f"/upstreams/unchecked/targets/{a}/healthy")
    ).code == 204
    assert await health_of(gateway, "unchecked") == dict.fromkeys(
        (a, b), "HEALTHCHECKS_OFF"
    )
    data = (
        await gateway.admin.get("/upstreams/unchecked/health?balancer_health=1")
    ).json["data"]
    assert data["health"] == "HEALTHCHECKS_OFF"


@pytest_twisted.ensureDeferred
async def test_probe_host_is_what_the_proxy_sends(gateway, servers):
    """
    With the upstream's C{host_header} set, an active probe carries the
    same C{Host} as a proxied request to that target.
    """
    resources, ports, keys = start_targets(servers, ["a"])
    await gateway.configure("named", {keys["a"]: 100}, host_header="api.example.com")
    assert (await spread(gateway, 1)) == Counter({"a": 1})
    proxied = resources["a"].requests[-1]["headers"].getRawHeaders(b"host")
    await gateway.admin.patch("/upstreams/named", form=doc_active_patch("0.2"))

    async def probed():
        return resources["a"].hits["/health"] > 0

    await wait_for(probed, 1)
    probe = next(r for r in resources["a"].requests if r["uri"] == b"/health")
    assert probe["headers"].getRawHeaders(b"host") == proxied


@pytest_twisted.ensureDeferred
async def test_passive_timeouts_and_broken_streams(gateway, servers):
    """
    Passive C{timeouts=1} and C{tcp_failures=1}: a target slower than the
    service's C{read_timeout} (200 ms) is UNHEALTHY after one timed-out
    attempt, and the client gets 200 from the retry; a target that breaks
    a response off after its first bytes is UNHEALTHY after one broken
    response (which the client sees cut short).
    """
    resources, ports, keys = start_targets(servers, ["a", "slow"])
    resources["slow"].delay = 1.0
    await gateway.configure(
        "timing",
        {keys["a"]: 100, keys["slow"]: 100},
        **{
            "healthchecks.passive.unhealthy.timeouts": "1",
            "healthchecks.passive.unhealthy.tcp_failures": "1",
        },
    )
    await gateway.admin.patch("/services/timing", form={"read_timeout": "200"})
    assert await spread(gateway, 4, concurrency=1) == Counter({"a": 4})
    assert resources["slow"].hits["/"] == 1
    assert await health_of(gateway, "timing") == {
        keys["a"]: "HEALTHY",
        keys["slow"]: "UNHEALTHY",
    }

    broken = SSEResource(count=5, interval=0.01)
    broken.break_after = 2
    servers.append(port := listen(broken))
    await gateway.admin.post(
        "/upstreams",
        form={"name": "breaking", "healthchecks.passive.unhealthy.tcp_failures": "1"},
    )
    await gateway.admin.post(
        "/upstreams/breaking/targets", form={"target": address(port)}
    )
    await gateway.admin.post("/services", form={"name": "breaking", "host": "breaking"})
    await gateway.admin.post("/services/breaking/routes", form={"paths[]": "/break"})
    with pytest.raises(ResponseFailed):
        # Cut off without the chunked terminator: not a complete answer.
        await gateway.proxy.get("/break")
    assert await health_of(gateway, "breaking") == {address(port): "UNHEALTHY"}
    assert len(broken.sent) == 2


@pytest_twisted.ensureDeferred
async def test_probes_leave_no_loop_behind(gateway, servers):
    """
    After the upstream with active checks is deleted, no LoopingCall of
    an active checker is left scheduled on the reactor.
    """
    from twisted.internet.task import LoopingCall

    from aigateway.health.active import ActiveChecker

    def checker_loops():
        loops = [getattr(call, "func", None) for call in reactor.getDelayedCalls()]
        return [
            loop
            for loop in loops
            if isinstance(loop, LoopingCall)
            and isinstance(getattr(loop.f, "__self__", None), ActiveChecker)
        ]

    resources, keys = await doc_upstream(gateway, servers)
    await gateway.admin.patch("/upstreams/ai-upstream", form=doc_active_patch("0.2"))
    assert len(checker_loops()) == 2
    await sleep(0.3)
    assert (await gateway.admin.delete("/upstreams/ai-upstream")).code == 204
    assert checker_loops() == []


@pytest_twisted.ensureDeferred
async def test_retry_after_on_the_only_target(gateway, servers):
    """
    With a single target, a 429 with C{Retry-After} cannot be retried
    elsewhere: the client gets the 429 and its C{Retry-After} as the
    target sent them; until the cooldown (1 s) is over, no target is
    available (503, C{failure to get a peer}); then it is used again.
    """
    resources, ports, keys = start_targets(servers, ["only"])
    await gateway.configure("single", {keys["only"]: 100})
    resources["only"].status = 429
    resources["only"].headers = {b"retry-after": b"1"}
    reply = await gateway.proxy.get("/")
    limited_at = reactor.seconds()
    assert reply.code == 429
    assert reply.headers.getRawHeaders(b"retry-after") == [b"1"]
    resources["only"].status = 200
    resources["only"].headers = {}
    during = await gateway.proxy.get("/")
    await sleep(1.05 - (reactor.seconds() - limited_at))
    assert (await gateway.proxy.get("/")).code == 200
    assert resources["only"].hits["/"] == 2
    # During the cooldown no target is available: the ring-balancer 503,
    # with a Retry-After that says when the target is back.
    assert during.code == 503
    assert during.json["message"] == "failure to get a peer from the ring-balancer"
    assert during.headers.getRawHeaders(b"retry-after") == [b"1"]


@implementer(IHostnameResolver)
class _Names:
    """
    A resolver that knows only C{names} (to 127.0.0.1), so a test decides
    which host names resolve, without a DNS server.
    """

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.asked: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        self.asked.append(hostName)
        resolution = HostResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        if hostName in self.names or hostName == "127.0.0.1":
            # (The tests' own clients connect to 127.0.0.1 by name too.)
            resolutionReceiver.addressResolved(
                IPv4Address("TCP", "127.0.0.1", portNumber)
            )
        resolutionReceiver.resolutionComplete()
        return resolution


@pytest_twisted.ensureDeferred
async def test_a_name_that_does_not_resolve_is_dns_error(gateway, servers):
    """
    A target whose host name does not resolve is shown as C{DNS_ERROR} in
    the health endpoint and the health gauge, and gets no traffic, even
    with health checks off: its name was looked up once, when the target
    was added, so no request was spent finding out.
    """
    resource = HoldingTarget("ok")
    servers.append(port := listen(resource))
    number = port.getHost().port
    names = _Names({"good.test"})
    previous = reactor.installNameResolver(names)
    try:
        await gateway.configure(
            "named", {f"broken.test:{number}": 100, f"good.test:{number}": 100}
        )
        replies = await bounded(40, 4, lambda i: gateway.proxy.get("/"))
        assert [r.code for r in replies] == [200] * 40
        health = await health_of(gateway, "named")
        assert health[f"broken.test:{number}"] == "DNS_ERROR"
        assert health[f"good.test:{number}"] == "HEALTHCHECKS_OFF"
        assert names.asked.count("broken.test") == 1
        samples = await scrape(gateway)
        broken = {"upstream": "named", "target": f"broken.test:{number}"}
        assert sample(samples, HEALTH, state="dns_error", **broken) == 1
        assert sample(samples, HEALTH, state="healthchecks_off", **broken) == 0
        assert sample(samples, ATTEMPTS, code="error", **broken) == 0
        reply = await gateway.admin.get("/upstreams/named/health?balancer_health=1")
        assert reply.json["data"]["health"] == "HEALTHY"  # one target still up
    finally:
        reactor.installNameResolver(previous)


@pytest_twisted.ensureDeferred
async def test_traffic_does_not_mask_failing_probes(gateway, servers):
    """
    Active checks every 1 s on C{/health}, passive checks off: a target
    whose C{/health} answers 500 but whose C{/} is fine is UNHEALTHY
    within 2 x 1 s (+1 s) while 15 requests a second go through it.
    """
    resources, keys = await doc_upstream(gateway, servers)
    resources["b"].statuses["/health"] = 500
    reply = await gateway.admin.patch(
        "/upstreams/ai-upstream", form=doc_active_patch("1")
    )
    assert reply.code == 200, reply.body
    start = reactor.seconds()
    while (await health_of(gateway, "ai-upstream"))[keys["b"]] != "UNHEALTHY":
        assert reactor.seconds() - start < 2 * 1 + 1, "traffic kept it in"
        assert (await gateway.proxy.get("/")).code == 200
        await sleep(1 / 15)
    assert resources["b"].hits["/"] >= 10


@pytest_twisted.ensureDeferred
async def test_a_target_due_a_trial_is_not_available_weight(gateway, servers):
    """
    Both targets answer 500 (passive C{http_failures=1}, C{cooldown=1}):
    once both are UNHEALTHY, the health endpoint shows no available weight
    and the upstream UNHEALTHY, and still does after the cooldown, when
    each is only due a trial request; the first trial that succeeds makes
    its weight available again.
    """
    resources, ports, keys = start_targets(servers, ["a", "b"])
    await gateway.configure(
        "failing",
        {key: 100 for key in keys.values()},
        **{
            "healthchecks.passive.unhealthy.http_failures": "1",
            "healthchecks.passive.unhealthy.cooldown": "1",
        },
    )
    for resource in resources.values():
        resource.status = 500
    assert (await gateway.proxy.get("/")).code == 500
    assert set((await health_of(gateway, "failing")).values()) == {"UNHEALTHY"}

    async def report():
        health = await gateway.admin.get("/upstreams/failing/health")
        balancer = await gateway.admin.get(
            "/upstreams/failing/health?balancer_health=1"
        )
        available = [row["data"]["weight"]["available"] for row in health.json["data"]]
        return available, balancer.json["data"]

    for wait in (0, 1.3):
        await sleep(wait)
        available, balancer = await report()
        assert available == [0, 0], wait
        assert balancer["health"] == "UNHEALTHY", wait
        assert balancer["balancer_health"] == "UNHEALTHY", wait
        assert balancer["details"]["weight"]["available"] == 0, wait

    resources["a"].status = 200
    assert (await gateway.proxy.get("/")).code == 200
    available, balancer = await report()
    assert sorted(available) == [0, 100]
    assert balancer["balancer_health"] == "HEALTHY"


@pytest_twisted.ensureDeferred
async def test_active_checks_retry_a_name_that_did_not_resolve(gateway, servers):
    """
    Active checks every 1 s, no traffic: a target whose host name does not
    resolve is C{DNS_ERROR} from the lookup made when it was added, its
    name is tried again every 5 s (not every probe round), and once the
    name resolves the next try brings it back HEALTHY, within 5 s
    (+1.5 s), and probed again.
    """
    resource = HoldingTarget("late")
    servers.append(port := listen(resource))
    key = f"late.test:{port.getHost().port}"
    names = _Names(set())
    previous = reactor.installNameResolver(names)
    try:
        await gateway.configure(
            "late",
            {key: 100},
            **{
                "healthchecks.active.healthy.interval": "1",
                "healthchecks.active.unhealthy.interval": "1",
            },
        )
        await wait_for(is_state(gateway, "late", key, "DNS_ERROR"), 1.5)
        assert names.asked.count("late.test") == 1
        names.names.add("late.test")
        took = await wait_for(is_state(gateway, "late", key, "HEALTHY"), 5 + 1.5)
        assert took > 3, "tried again before the DNS retry was due"
        # (The probes' own lookups follow, once it is HEALTHY.)
        assert names.asked.count("late.test") >= 2

        async def probed():
            return resource.hits["/"] >= 1

        await wait_for(probed, 1.5)
    finally:
        reactor.installNameResolver(previous)
