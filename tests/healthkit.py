"""
Values and fakes for the health-check tests: upstreams built through the
real schema (so the defaults are the ones the Admin API stores), targets,
snapshots, a prober whose probes a test answers by hand, and a name
resolver whose answers a test decides.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.internet._resolver import HostResolution
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from zope.interface import implementer

from aigateway.addresses import parse_target
from aigateway.config import ConfigSnapshot, empty_records
from aigateway.health.active import IProber
from aigateway.health.passive import Outcome
from aigateway.model import Target, Upstream
from aigateway.records import build_record


def _deep(tree: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    for path, value in dotted.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def upstream_record(
    uid: str = "u1", /, name: str | None = None, **checks: Any
) -> dict[str, Any]:
    """
    A valid upstream record; C{checks} are C{healthchecks} fields with
    dots written as double underscores (C{active__healthy__interval=5}).
    """
    tree = _deep({}, {k.replace("__", "."): v for k, v in checks.items()})
    rec, errors = build_record(
        "upstreams", {"name": name or uid, "healthchecks": tree}, coerce=False
    )
    assert not errors, errors
    return rec | {"id": uid}


def upstream(uid: str = "u1", /, **checks: Any) -> Upstream:
    """
    An upstream value; see L{upstream_record}.
    """
    return Upstream.from_record(upstream_record(uid, **checks))


def target(
    key: str = "10.0.0.1:80", upstream_id: str = "u1", weight: int = 100
) -> Target:
    """
    A target value of C{upstream_id}.
    """
    parsed = parse_target(key)
    assert parsed is not None
    return Target(
        id=f"t-{upstream_id}-{key}",
        upstream_id=upstream_id,
        key=key,
        host=parsed[0],
        port=parsed[1],
        weight=weight,
    )


def target_record(
    key: str, upstream_id: str = "u1", weight: int = 100
) -> dict[str, Any]:
    """
    A valid target record of C{upstream_id}.
    """
    rec, errors = build_record(
        "targets",
        {"target": key, "weight": weight, "upstream": {"id": upstream_id}},
        coerce=False,
    )
    assert not errors, errors
    return rec | {"id": f"t-{upstream_id}-{key}"}


def snapshot(
    version: int,
    upstreams: list[dict[str, Any]],
    targets: list[dict[str, Any]],
) -> ConfigSnapshot:
    """
    A snapshot of upstream and target records.
    """
    records = empty_records()
    records["upstreams"] = {u["id"]: u for u in upstreams}
    records["targets"] = {t["id"]: t for t in targets}
    return ConfigSnapshot.build(version, records)


def one_upstream(version: int, keys: dict[str, int], **checks: Any) -> ConfigSnapshot:
    """
    A snapshot of upstream C{u1} (C{llm}) with health C{checks} and targets
    C{{key: weight}}.
    """
    return snapshot(
        version,
        [upstream_record("u1", name="llm", **checks)],
        [target_record(k, "u1", w) for k, w in keys.items()],
    )


@implementer(IProber)
class FakeProber:
    """
    A prober whose probes stay pending until the test fires them.

    @ivar probes: every probe started, in order, as C{(target key,
        Deferred)}.
    """

    def __init__(self) -> None:
        self.probes: list[tuple[str, defer.Deferred[Outcome]]] = []
        self.cancelled: list[str] = []

    def probe(self, upstream: Upstream, target: Target) -> defer.Deferred[Outcome]:
        key = target.key

        def cancel(d: defer.Deferred[Outcome]) -> None:
            self.cancelled.append(key)

        d: defer.Deferred[Outcome] = defer.Deferred(cancel)
        self.probes.append((key, d))
        return d

    def pending(self) -> list[str]:
        """
        The keys of the probes not answered yet.
        """
        return [key for key, d in self.probes if not d.called]

    def answer(self, outcome: Outcome, key: str | None = None) -> None:
        """
        Answer every pending probe (of C{key}, if given) with C{outcome}.
        """
        for k, d in list(self.probes):
            if not d.called and key in (None, k):
                d.callback(outcome)


@implementer(IProber)
class AnsweringProber:
    """
    A prober that answers at once, with C{outcomes[key]} (default 200).
    """

    def __init__(self, outcomes: dict[str, Outcome] | None = None) -> None:
        self.outcomes = outcomes or {}
        self.calls: list[str] = []

    def probe(self, upstream: Upstream, target: Target) -> defer.Deferred[Outcome]:
        self.calls.append(target.key)
        return defer.succeed(self.outcomes.get(target.key, Outcome.status(200)))


@implementer(IHostnameResolver)
class Names:
    """
    A name resolver that answers from C{answers} (name to IP addresses; a
    name not there, or with none, does not resolve), so a test decides
    what resolves, without a DNS server.  An IP address resolves to itself
    (the tests' own HTTP clients look up C{127.0.0.1} too).

    @ivar asked: every name asked for, in order (IP addresses left out).
    @ivar hold: when true, lookups of names wait in L{held} until
        L{release}.
    """

    def __init__(
        self, answers: dict[str, list[str]] | None = None, hold: bool = False
    ) -> None:
        self.answers = answers if answers is not None else {}
        self.hold = hold
        self.asked: list[str] = []
        self.held: list[tuple[str, IResolutionReceiver, int]] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> HostResolution:
        resolution = HostResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        if _is_ip(hostName):
            self._answer(resolutionReceiver, [hostName], portNumber)
            return resolution
        self.asked.append(hostName)
        if self.hold:
            self.held.append((hostName, resolutionReceiver, portNumber))
        else:
            self._answer(resolutionReceiver, self.answers.get(hostName, []), portNumber)
        return resolution

    def release(self, name: str | None = None) -> None:
        """
        Answer the held lookups (of C{name}, if given) from L{answers}.
        """
        held, self.held = self.held, []
        for host, receiver, port in held:
            if name in (None, host):
                self._answer(receiver, self.answers.get(host, []), port)
            else:
                self.held.append((host, receiver, port))

    @staticmethod
    def _answer(receiver: IResolutionReceiver, ips: list[str], port: int) -> None:
        for ip in ips:
            kind = IPv6Address if ":" in ip else IPv4Address
            receiver.addressResolved(kind("TCP", ip, port))
        receiver.resolutionComplete()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
