"""
Tests for L{aigateway.health.dns}: the host names of targets are looked up
when the targets are added, and the health endpoint shows what they
resolved to (one address per IP), that they did not (C{DNS_ERROR}), or
that nobody knows yet (C{DNS_PENDING}), never a name in C{ip} nor a target
nobody looked up as healthy weight.

The unit tests drive a L{HealthManager} with a L{task.Clock} and a resolver
whose answers the test decides; the end-to-end tests run a real gateway on
loopback with that resolver installed in the reactor, as the proxy uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.interfaces import IHostnameResolver
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aigateway.config import ConfigSnapshot
from aigateway.health.dns import LOOKUP_REFRESH, LOOKUP_TIMEOUT, ReactorNames
from aigateway.health.manager import HealthManager
from aigateway.health.state import DNS_RETRY
from aigateway.metrics import HEALTH_STATES

from .gatewaykit import HoldingTarget, address, listen, sample, scrape
from .healthkit import (
    FakeProber,
    Names,
    one_upstream,
    snapshot,
    target,
)

NAME, IP = "api.test:443", "10.0.0.9:443"
ACTIVE_ON = {"active__healthy__interval": 60, "active__unhealthy__interval": 60}
HEALTH = "aigateway_upstream_target_health"


class LookupMixin:
    def make(
        self, names: Names, jitter: Callable[[], float] = lambda: 0.0
    ) -> HealthManager:
        """
        A manager that looks names up with C{names}; its refreshes are
        spread by C{jitter}, by default not at all (every
        L{LOOKUP_REFRESH} seconds exactly).
        """
        self.clock = task.Clock()
        self.names = names
        self.logged: list[dict[str, Any]] = []
        self.manager = HealthManager(
            self.clock,
            FakeProber(),
            log=Logger(observer=cast(ILogObserver, self.logged.append)),
            resolver=names,
            jitter=jitter,
        )
        return self.manager

    def config(
        self, version: int, keys: dict[str, int] | None = None, /, **checks: Any
    ) -> ConfigSnapshot:
        keys = {NAME: 100} if keys is None else keys
        snap = one_upstream(version, keys, **checks)
        self.manager.update(snap)
        return snap

    def health(self, key: str = NAME) -> str:
        return str(self.manager.describe(target(key))["health"])

    def addresses(self, key: str = NAME) -> tuple[str, ...]:
        return self.manager.addresses(target(key))


class PendingTests(LookupMixin, SynchronousTestCase):
    """
    Until its name's first lookup answers, a target is C{DNS_PENDING}: no
    addresses, no available weight, but still picked (the proxy looks the
    name up itself when it connects).
    """

    def test_pending_then_resolved(self) -> None:
        manager = self.make(Names({"api.test": ["10.1.0.1"]}, hold=True))
        self.config(1, {NAME: 100, IP: 100}, **ACTIVE_ON)
        self.assertEqual(self.names.asked, ["api.test"])  # at once, only the name
        self.assertEqual(self.health(), "DNS_PENDING")
        self.assertEqual(self.addresses(), ())
        self.assertFalse(manager.is_available(target(NAME)))
        self.assertTrue(manager.available(target(NAME)))
        self.assertEqual(self.health(IP), "HEALTHY")
        self.assertEqual(self.addresses(IP), ("10.0.0.9",))
        self.names.release()
        self.assertEqual(self.health(), "HEALTHY")
        self.assertEqual(self.addresses(), ("10.1.0.1",))
        self.assertTrue(manager.is_available(target(NAME)))

    def test_pending_is_no_available_weight(self) -> None:
        """
        An upstream whose only target is not looked up yet is not HEALTHY.
        """
        manager = self.make(Names({"api.test": ["10.1.0.1"]}, hold=True))
        self.config(1, **ACTIVE_ON)
        self.assertEqual(manager.upstream_health("u1"), "UNHEALTHY")
        self.names.release()
        self.assertEqual(manager.upstream_health("u1"), "HEALTHY")

    def test_checks_off(self) -> None:
        self.make(Names({"api.test": ["10.1.0.1"]}, hold=True))
        self.config(1)
        self.assertEqual(self.health(), "DNS_PENDING")
        self.names.release()
        self.assertEqual(self.health(), "HEALTHCHECKS_OFF")

    def test_unhealthy_stays_unhealthy(self) -> None:
        """
        A target set unhealthy before its name was looked up is shown
        UNHEALTHY: that is true whatever the name resolves to.
        """
        manager = self.make(Names({"api.test": ["10.1.0.1"]}, hold=True))
        self.config(1, **ACTIVE_ON)
        manager.set_manual(target(NAME), False)
        self.assertEqual(self.health(), "UNHEALTHY")

    def test_no_resolver(self) -> None:
        """
        Without a resolver nothing is looked up: names stay pending.
        """
        self.clock = task.Clock()
        self.manager = HealthManager(self.clock, FakeProber())
        self.config(1, {NAME: 100, IP: 100})
        self.assertEqual(self.health(), "DNS_PENDING")
        self.assertEqual(self.health(IP), "HEALTHCHECKS_OFF")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ResolvedTests(LookupMixin, SynchronousTestCase):
    def test_one_address(self) -> None:
        self.make(Names({"api.test": ["10.1.0.1"]}))
        self.config(1, **ACTIVE_ON)
        self.assertEqual(self.health(), "HEALTHY")
        self.assertEqual(self.addresses(), ("10.1.0.1",))

    def test_two_addresses_once_each(self) -> None:
        self.make(Names({"api.test": ["10.1.0.1", "2001:db8::1", "10.1.0.1"]}))
        self.config(1)
        self.assertEqual(self.addresses(), ("10.1.0.1", "2001:db8::1"))
        self.assertEqual(self.health(), "HEALTHCHECKS_OFF")

    def test_ip_targets_not_looked_up(self) -> None:
        self.make(Names())
        self.config(1, {IP: 100, "[2001:db8::2]:80": 100}, **ACTIVE_ON)
        self.assertEqual(self.names.asked, [])
        self.assertEqual(self.addresses("[2001:db8::2]:80"), ("2001:db8::2",))

    def test_refreshed(self) -> None:
        """
        The name is looked up again every L{LOOKUP_REFRESH} seconds: new
        addresses replace the old; a name that stopped resolving takes the
        target out.
        """
        manager = self.make(Names({"api.test": ["10.1.0.1"]}))
        self.config(1, **ACTIVE_ON)
        self.names.answers["api.test"] = ["10.1.0.2", "10.1.0.3"]
        self.clock.advance(LOOKUP_REFRESH - 0.1)
        self.assertEqual(self.addresses(), ("10.1.0.1",))
        self.clock.advance(0.1)
        self.assertEqual(self.addresses(), ("10.1.0.2", "10.1.0.3"))
        del self.names.answers["api.test"]
        self.clock.advance(LOOKUP_REFRESH)
        self.assertEqual(self.health(), "DNS_ERROR")
        self.assertFalse(manager.available(target(NAME)))
        self.assertEqual(len(self.names.asked), 3)


class DNSErrorTests(LookupMixin, SynchronousTestCase):
    """
    A name that does not resolve is C{DNS_ERROR} from its first lookup: no
    addresses, no traffic; it is looked up again every L{DNS_RETRY}
    seconds, and comes back in the state it had once it resolves.
    """

    def test_unresolvable(self) -> None:
        manager = self.make(Names())
        self.config(1, {NAME: 100, IP: 100}, **ACTIVE_ON)
        self.assertEqual(self.health(), "DNS_ERROR")
        self.assertEqual(self.addresses(), ())
        self.assertFalse(manager.available(target(NAME)))
        self.assertFalse(manager.is_available(target(NAME)))
        self.assertEqual(manager.upstream_health("u1"), "HEALTHY")  # the IP
        self.clock.pump([DNS_RETRY] * 3)
        self.assertEqual(self.names.asked, ["api.test"] * 4)
        self.names.answers["api.test"] = ["10.1.0.1"]
        self.clock.advance(DNS_RETRY)
        self.assertEqual(self.health(), "HEALTHY")
        self.assertEqual(self.addresses(), ("10.1.0.1",))
        self.assertTrue(manager.available(target(NAME)))

    def test_proxied_failure_looks_up_after_retry(self) -> None:
        """
        A proxied attempt that failed to resolve the name takes the target
        out; the next lookup is L{DNS_RETRY} seconds later, not a refresh
        later, and its answer lists the addresses again.
        """
        manager = self.make(Names({"api.test": ["10.1.0.1"]}))
        self.config(1, **ACTIVE_ON)
        self.clock.advance(1)
        manager.report_failure(target(NAME), timeout=False, dns=True)
        self.assertEqual(self.health(), "DNS_ERROR")
        self.assertEqual(self.addresses(), ())
        self.clock.advance(DNS_RETRY - 0.1)
        self.assertEqual(len(self.names.asked), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.names.asked), 2)
        self.assertEqual(self.health(), "HEALTHY")
        self.assertEqual(self.addresses(), ("10.1.0.1",))

    def test_tries_shared_with_the_proxy(self) -> None:
        """
        One schedule of tries of the name, whoever tries: a proxied attempt
        that failed to resolve it postpones the lookup to L{DNS_RETRY}
        after it, and a lookup under way is the try a proxied attempt
        would otherwise get as its trial.
        """
        manager = self.make(Names())
        self.config(1, **ACTIVE_ON)  # looked up at 0: next at 5
        self.clock.advance(3)
        manager.report_failure(target(NAME), timeout=False, dns=True)
        self.clock.advance(2)
        self.assertEqual(len(self.names.asked), 1)  # not at 5...
        self.clock.advance(3)
        self.assertEqual(len(self.names.asked), 2)  # ...but at 8
        self.names.hold = True
        self.clock.advance(DNS_RETRY)  # at 13, held
        self.assertEqual(len(self.names.asked), 3)
        self.assertFalse(manager.eligible(target(NAME)))
        self.assertFalse(manager.available(target(NAME)))
        self.clock.advance(DNS_RETRY)  # no answer yet, past the retry
        self.assertTrue(manager.available(target(NAME)))  # the proxy's trial

    def test_back_by_probe_looks_up_at_once(self) -> None:
        """
        A probe that gets past the lookup brings the target back; its
        addresses are not known then, and are looked up at once.
        """
        manager = self.make(Names({"api.test": ["10.1.0.1"]}))
        self.config(1, **ACTIVE_ON)
        manager.report_failure(target(NAME), timeout=False, dns=True)
        self.clock.advance(DNS_RETRY - 1)
        manager.report_status(target(NAME), 200)  # e.g. a probe that connected
        self.assertEqual(self.health(), "DNS_PENDING")
        self.clock.advance(0)
        self.assertEqual(self.health(), "HEALTHY")
        self.assertEqual(self.addresses(), ("10.1.0.1",))

    def test_checks_toggled_keep_dns_error(self) -> None:
        """
        Turning checks on or off does not make a name resolve: the target
        stays C{DNS_ERROR}, and comes back in the new state.
        """
        self.make(Names())
        self.config(1)
        self.assertEqual(self.health(), "DNS_ERROR")
        self.config(2, **ACTIVE_ON)
        self.assertEqual(self.health(), "DNS_ERROR")
        self.assertEqual(len(self.names.asked), 1)
        self.names.answers["api.test"] = ["10.1.0.1"]
        self.clock.advance(DNS_RETRY)
        self.assertEqual(self.health(), "HEALTHY")

    def test_slow_lookup(self) -> None:
        """
        A lookup unanswered after L{LOOKUP_TIMEOUT} seconds counts as a
        failure; the name is not asked again before it answers, and its
        late answer still counts.
        """
        manager = self.make(Names({"api.test": ["10.1.0.1"]}, hold=True))
        self.config(1, **ACTIVE_ON)
        self.clock.advance(LOOKUP_TIMEOUT)
        self.assertEqual(self.health(), "DNS_ERROR")
        self.clock.pump([DNS_RETRY] * 4)
        self.assertEqual(len(self.names.asked), 1)
        self.assertTrue(any("took over" in e["log_format"] for e in self.logged))
        self.names.release()
        self.assertEqual(self.health(), "HEALTHY")
        self.assertTrue(manager.available(target(NAME)))


class LifecycleTests(LookupMixin, SynchronousTestCase):
    def test_removed_target_forgotten(self) -> None:
        self.make(Names({"api.test": ["10.1.0.1"]}, hold=True))
        self.config(1)
        self.config(2, {IP: 100})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.names.release()  # a late answer for nobody
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_weight_zero_forgotten(self) -> None:
        self.make(Names({"api.test": ["10.1.0.1"]}))
        self.config(1)
        self.config(2, {NAME: 0})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_removed_upstream_forgotten(self) -> None:
        self.make(Names({"api.test": ["10.1.0.1"]}))
        self.config(1)
        self.manager.update(snapshot(2, [], []))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopped_for_good(self) -> None:
        """
        A configuration put in force after L{HealthManager.stop} (a store's
        late answer on a stopping node) updates the states, but looks no
        name up and starts no active check.
        """
        self.make(Names({"api.test": ["10.1.0.1"], "new.test": ["10.1.0.2"]}))
        self.config(1)
        self.manager.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.config(2, {NAME: 100, "new.test:80": 100}, **ACTIVE_ON)
        self.assertEqual(self.names.asked, ["api.test"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.health(), "HEALTHY")  # checks on, kept
        self.assertEqual(self.health("new.test:80"), "DNS_PENDING")

    def test_hung_lookup_remembered_across_stop(self) -> None:
        """
        A lookup still out when lookups stop holds its thread until it
        answers: the name watched again meanwhile waits for that answer,
        and is not asked a second time; its deadline still runs from when
        it was sent.
        """
        manager = self.make(Names({"api.test": ["10.1.0.1"]}, hold=True))
        self.config(1)
        lookups = manager._lookups
        lookups.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(4)
        lookups.watch(manager._states["u1"][NAME])
        self.assertEqual(len(self.names.asked), 1)
        self.clock.advance(LOOKUP_TIMEOUT - 4)
        self.assertEqual(self.health(), "DNS_ERROR")
        self.names.release()
        self.assertEqual(self.health(), "HEALTHCHECKS_OFF")
        self.assertEqual(self.addresses(), ("10.1.0.1",))
        self.assertEqual(len(self.names.asked), 1)

    def test_reactor_names(self) -> None:
        """
        L{ReactorNames} asks whichever resolver the reactor has at the
        time, as the proxy's endpoints do.
        """

        class Reactor:
            nameResolver: Any = None

        fake = Reactor()
        names = ReactorNames(fake)
        verifyObject(IHostnameResolver, names)
        fake.nameResolver = Names({"api.test": ["10.1.0.1"]})
        found: list[Any] = []

        class Receiver:
            def resolutionBegan(self, resolution: Any) -> None:
                pass

            def addressResolved(self, address: Any) -> None:
                found.append(address.host)

            def resolutionComplete(self) -> None:
                found.append(None)

        names.resolveHostName(Receiver(), "api.test", 443)
        self.assertEqual(found, ["10.1.0.1", None])


# End to end: a real gateway, with the test's resolver installed in the
# reactor (the proxy's HostnameEndpoints and the lookups both ask it).


async def _rows(gateway: Any, upstream: str) -> dict[str, Any]:
    reply = await gateway.admin.get(f"/upstreams/{upstream}/health")
    assert reply.code == 200, reply.body
    return {row["target"]: row for row in reply.json["data"]}


async def _balancer(gateway: Any, upstream: str) -> dict[str, Any]:
    reply = await gateway.admin.get(f"/upstreams/{upstream}/health?balancer_health=1")
    assert reply.code == 200, reply.body
    return dict(reply.json["data"])


def _states(samples: Any, upstream: str, key: str) -> list[str]:
    return [
        state
        for state in HEALTH_STATES
        if sample(samples, HEALTH, upstream=upstream, target=key, state=state) == 1
    ]


@pytest_twisted.ensureDeferred
async def test_not_looked_up_yet_is_not_healthy(gateway, servers):
    """
    While the lookup of a target's name has not answered, the health
    endpoint shows it C{DNS_PENDING} with no addresses and no available
    weight, not C{HEALTHY} with the name as its C{ip}; its C{dns_pending}
    health series is 1; the upstream counts none of its weight.  Once the name
    resolves, its address is listed.
    """
    servers.append(port := listen(HoldingTarget("a")))
    number = port.getHost().port
    key = f"slow.test:{number}"
    names = Names({"slow.test": ["127.0.0.1"]}, hold=True)
    previous = reactor.installNameResolver(names)
    try:
        await gateway.configure("slow", {key: 100})
        reply = await gateway.admin.patch(
            "/upstreams/slow", form={"healthchecks.passive.unhealthy.tcp_failures": "1"}
        )
        assert reply.code == 200, reply.body
        row = (await _rows(gateway, "slow"))[key]
        assert row["health"] == "DNS_PENDING"
        assert row["data"]["addresses"] == []
        assert row["data"]["weight"] == {
            "total": 100,
            "available": 0,
            "unavailable": 100,
        }
        balancer = await _balancer(gateway, "slow")
        assert balancer["health"] == "UNHEALTHY"
        assert balancer["balancer_health"] == "UNHEALTHY"
        assert balancer["details"]["weight"]["available"] == 0
        assert _states(await scrape(gateway), "slow", key) == ["dns_pending"]

        names.release()
        row = (await _rows(gateway, "slow"))[key]
        assert row["health"] == "HEALTHY"
        assert row["data"]["addresses"] == [
            {"ip": "127.0.0.1", "port": number, "weight": 100, "health": "HEALTHY"}
        ]
        assert row["data"]["weight"]["available"] == 100
        assert (await _balancer(gateway, "slow"))["balancer_health"] == "HEALTHY"
        assert _states(await scrape(gateway), "slow", key) == ["healthy"]
    finally:
        reactor.installNameResolver(previous)


@pytest_twisted.ensureDeferred
async def test_pending_without_checks_is_healthchecks_off(gateway, servers):
    """
    C{?balancer_health=1} on an upstream with every check off: a target
    whose name is not looked up yet takes traffic unchecked as much as a
    resolved one, so the upstream shows C{HEALTHCHECKS_OFF} meanwhile (after
    every restart, and with each new name), not C{UNHEALTHY}; its weight is
    still not available until the name resolves.
    """
    servers.append(port := listen(HoldingTarget("a")))
    key = f"slow.test:{port.getHost().port}"
    names = Names({"slow.test": ["127.0.0.1"]}, hold=True)
    previous = reactor.installNameResolver(names)
    try:
        await gateway.configure("off", {key: 100})
        balancer = await _balancer(gateway, "off")
        assert balancer["health"] == "HEALTHCHECKS_OFF"
        assert balancer["balancer_health"] == "HEALTHCHECKS_OFF"
        assert balancer["details"]["weight"]["available"] == 0
        names.release()
        balancer = await _balancer(gateway, "off")
        assert balancer["health"] == "HEALTHCHECKS_OFF"
        assert balancer["balancer_health"] == "HEALTHCHECKS_OFF"
        assert balancer["details"]["weight"]["available"] == 100
    finally:
        names.release()
        reactor.installNameResolver(previous)


@pytest_twisted.ensureDeferred
async def test_resolved_names_list_their_ips(gateway, servers):
    """
    A name that resolves to one IP lists one address, one that resolves to
    two lists both, each with the target's port and weight; the proxy
    reaches the target by the same name.
    """
    servers.append(port := listen(HoldingTarget("one")))
    number = port.getHost().port
    one, two = f"one.test:{number}", f"two.test:{number}"
    names = Names({"one.test": ["127.0.0.1"], "two.test": ["127.0.0.1", "127.0.0.2"]})
    previous = reactor.installNameResolver(names)
    try:
        await gateway.configure("named", {one: 100, two: 0})
        reply = await gateway.admin.post(
            "/upstreams/named/targets", form={"target": two, "weight": "50"}
        )
        assert reply.code in (200, 201), reply.body
        rows = await _rows(gateway, "named")
        assert rows[one]["health"] == "HEALTHCHECKS_OFF"
        assert rows[one]["data"]["addresses"] == [
            {
                "ip": "127.0.0.1",
                "port": number,
                "weight": 100,
                "health": "HEALTHCHECKS_OFF",
            }
        ]
        assert rows[two]["data"]["host"] == "two.test"
        assert rows[two]["data"]["addresses"] == [
            {"ip": ip, "port": number, "weight": 50, "health": "HEALTHCHECKS_OFF"}
            for ip in ("127.0.0.1", "127.0.0.2")
        ]
        assert rows[two]["data"]["weight"]["available"] == 50
        reply = await gateway.admin.patch(
            "/upstreams/named/targets/" + two, form={"weight": "0"}
        )
        assert reply.code == 200, reply.body
        assert (await gateway.proxy.get("/")).body == b"one"
    finally:
        reactor.installNameResolver(previous)


@pytest_twisted.ensureDeferred
async def test_unresolvable_is_dns_error_without_addresses(gateway, servers):
    """
    A name that does not resolve is C{DNS_ERROR} as soon as its target is
    added, with no addresses and none of its weight available; its
    C{dns_error} series is 1.
    """
    servers.append(port := listen(HoldingTarget("ok")))
    key = f"nowhere.test:{port.getHost().port}"
    previous = reactor.installNameResolver(Names())
    try:
        await gateway.configure("gone", {key: 100, address(port): 100})
        rows = await _rows(gateway, "gone")
        assert rows[key]["health"] == "DNS_ERROR"
        assert rows[key]["data"]["addresses"] == []
        assert rows[key]["data"]["weight"]["available"] == 0
        assert rows[address(port)]["data"]["addresses"][0]["ip"] == "127.0.0.1"
        assert _states(await scrape(gateway), "gone", key) == ["dns_error"]
    finally:
        reactor.installNameResolver(previous)


@pytest_twisted.ensureDeferred
async def test_overall_health_counts_only_resolved_weight(gateway, servers):
    """
    C{?balancer_health=1}: of an IP target (100), a name not looked up yet
    (300) and a name that does not resolve (50), only the IP target's
    weight is available, which is under a threshold of 50 %.
    """
    servers.append(port := listen(HoldingTarget("ip")))
    number = port.getHost().port
    names = Names(hold=True)
    previous = reactor.installNameResolver(names)
    try:
        pending, broken = f"pending.test:{number}", f"broken.test:{number}"
        await gateway.configure("mixed", {address(port): 100, pending: 300, broken: 50})
        reply = await gateway.admin.patch(
            "/upstreams/mixed", form={"healthchecks.threshold": "50"}
        )
        assert reply.code == 200, reply.body
        names.release("broken.test")
        rows = await _rows(gateway, "mixed")
        assert {k: r["health"] for k, r in rows.items()} == {
            address(port): "HEALTHCHECKS_OFF",
            pending: "DNS_PENDING",
            broken: "DNS_ERROR",
        }
        balancer = await _balancer(gateway, "mixed")
        assert balancer["details"]["weight"] == {
            "total": 450,
            "available": 100,
            "unavailable": 350,
        }
        assert balancer["health"] == "HEALTHY"
        assert balancer["balancer_health"] == "UNHEALTHY"
    finally:
        names.release()
        reactor.installNameResolver(previous)
