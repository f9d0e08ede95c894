"""
Tests for L{aigateway.health.active}: probe scheduling on a L{task.Clock}
with fake probers, and L{AgentProber} against real loopback servers.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import defer, error, task
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from aigateway.health.active import ActiveChecker, AgentProber, IProber, host_header
from aigateway.health.passive import Outcome, outcome_of_failure
from aigateway.health.state import ACTIVE, Health, TargetHealth
from tests.healthkit import AnsweringProber, FakeProber, target, upstream

KEYS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80", "10.0.0.5:80"]


class CheckerMixin:
    """
    Builds an L{ActiveChecker} over real target states.
    """

    def make(
        self, prober: IProber, keys: list[str] = KEYS[:2], **checks: Any
    ) -> ActiveChecker:
        self.clock = task.Clock()
        self.upstream = upstream(**checks)
        self.results: list[tuple[float, str, Outcome]] = []
        self.transitions: list[tuple[float, str, Health]] = []
        self.states = {
            k: TargetHealth(
                target(k),
                self.upstream,
                self.clock,
                lambda s, old, new, cause: self.transitions.append(
                    (self.clock.seconds(), s.target.key, new)
                ),
            )
            for k in keys
        }

        def on_result(state: TargetHealth, outcome: Outcome) -> None:
            self.results.append((self.clock.seconds(), state.target.key, outcome))
            state.record(outcome, ACTIVE)

        self.checker = ActiveChecker(
            self.clock, prober, self.upstream, self.states, on_result
        )
        return self.checker

    def probe_times(self) -> list[tuple[float, str]]:
        return [(t, k) for t, k, _ in self.results]


class ScheduleTests(CheckerMixin, SynchronousTestCase):
    """
    Probes happen at exactly the configured intervals.
    """

    def test_healthy_interval(self) -> None:
        self.make(AnsweringProber(), active__healthy__interval=5)
        self.clock.advance(4.9)
        self.assertEqual(self.results, [])
        self.clock.advance(0.1)
        self.assertEqual(self.probe_times(), [(5, KEYS[0]), (5, KEYS[1])])
        self.clock.pump([5, 5])
        self.assertEqual(len(self.results), 6)
        self.assertEqual({t for t, _ in self.probe_times()}, {5, 10, 15})

    def test_transition_moments(self) -> None:
        """
        A failing target is taken out at its second failed probe, then
        probed at the unhealthy interval and brought back at its second
        success.
        """
        outcomes = {KEYS[0]: Outcome.status(500)}
        self.make(
            AnsweringProber(outcomes),
            keys=KEYS[:1],
            active__healthy__interval=10,
            active__unhealthy__interval=3,
        )
        self.clock.pump([1] * 20)
        self.assertEqual(self.transitions, [(20, KEYS[0], Health.UNHEALTHY)])
        self.assertEqual(self.probe_times(), [(10, KEYS[0]), (20, KEYS[0])])
        outcomes[KEYS[0]] = Outcome.status(200)
        self.clock.pump([1] * 10)
        self.assertEqual(
            self.transitions,
            [(20, KEYS[0], Health.UNHEALTHY), (24, KEYS[0], Health.HEALTHY)],
        )
        # 21 and 24 by the unhealthy round, 30 by the healthy one.
        self.assertEqual([t for t, _ in self.probe_times()], [10, 20, 21, 24, 30])

    def test_zero_interval_disables_side(self) -> None:
        prober = AnsweringProber()
        self.make(prober, active__unhealthy__interval=5)
        self.clock.pump([5] * 4)
        self.assertEqual(prober.calls, [])
        self.checker.stop()
        self.make(prober, active__healthy__interval=0, active__unhealthy__interval=0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_probes_by_class(self) -> None:
        """
        Each round probes only the targets of its health class.
        """
        prober = AnsweringProber({KEYS[1]: Outcome.status(500)})
        self.make(prober, active__healthy__interval=10, active__unhealthy__interval=4)
        self.states[KEYS[1]].set_manual(False)
        self.clock.pump([4, 4])
        self.assertEqual(prober.calls, [KEYS[1], KEYS[1]])
        self.clock.advance(2)
        self.assertEqual(prober.calls, [KEYS[1], KEYS[1], KEYS[0]])

    def test_update_reschedules(self) -> None:
        prober = AnsweringProber()
        checker = self.make(prober, active__healthy__interval=5)
        self.clock.advance(1)
        checker.update(upstream(active__healthy__interval=10))
        self.clock.advance(9.9)
        self.assertEqual(prober.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(len(prober.calls), 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_update_keeps_rhythm(self) -> None:
        """
        Settings other than the intervals do not restart the rounds.
        """
        prober = AnsweringProber()
        checker = self.make(prober, active__healthy__interval=5)
        self.clock.advance(3)
        checker.update(upstream(active__healthy__interval=5, active__http_path="/h"))
        self.clock.advance(2)
        self.assertEqual(len(prober.calls), 2)

    def test_synchronous_answers(self) -> None:
        """
        A prober that answers at once probes every target, one at a time.
        """
        keys = [f"10.0.1.{i}:80" for i in range(200)]
        prober = AnsweringProber()
        self.make(prober, keys=keys, active__healthy__interval=1, active__concurrency=1)
        self.clock.advance(1)
        self.assertEqual(prober.calls, keys)
        self.assertEqual(self.checker.in_flight, 0)


class ConcurrencyTests(CheckerMixin, SynchronousTestCase):
    def test_bound(self) -> None:
        prober = FakeProber()
        checker = self.make(
            prober,
            keys=KEYS,
            active__healthy__interval=5,
            active__concurrency=2,
            active__timeout=0,
        )
        self.clock.advance(5)
        self.assertEqual(prober.pending(), KEYS[:2])
        prober.answer(Outcome.status(200), KEYS[0])
        self.assertEqual(prober.pending(), [KEYS[1], KEYS[2]])
        self.assertEqual(checker.in_flight, 2)
        # A round while probes are queued or running adds no duplicate.
        self.clock.advance(5)
        prober.answer(Outcome.status(200))
        prober.answer(Outcome.status(200))
        prober.answer(Outcome.status(200))
        self.assertEqual(sorted(k for k, _ in prober.probes), sorted(KEYS + [KEYS[0]]))
        self.assertEqual(checker.in_flight, 0)

    def test_timeout(self) -> None:
        prober = FakeProber()
        self.make(prober, keys=KEYS[:1], active__healthy__interval=5, active__timeout=2)
        self.clock.advance(5)
        self.clock.advance(1.9)
        self.assertEqual(self.results, [])
        self.clock.advance(0.1)
        self.assertEqual(prober.cancelled, [KEYS[0]])
        self.assertEqual(self.results, [(7, KEYS[0], Outcome.timeout())])
        self.assertEqual(self.states[KEYS[0]].counters["timeouts"], 1)
        self.assertEqual(self.checker.in_flight, 0)
        # Only the round's LoopingCall is left.
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_failure_classified(self) -> None:
        prober = FakeProber()
        self.make(prober, keys=KEYS[:1], active__healthy__interval=5)
        self.clock.advance(5)
        prober.probes[0][1].errback(error.ConnectionRefusedError())
        self.assertEqual(self.results, [(5, KEYS[0], Outcome.tcp_failure())])


class StopTests(CheckerMixin, SynchronousTestCase):
    def test_stop(self) -> None:
        prober = FakeProber()
        checker = self.make(
            prober,
            keys=KEYS,
            active__healthy__interval=5,
            active__unhealthy__interval=5,
            active__concurrency=2,
        )
        self.clock.advance(5)
        checker.stop()
        self.assertEqual(sorted(prober.cancelled), KEYS[:2])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(checker.in_flight, 0)
        self.assertEqual(prober.pending(), [])
        self.assertEqual(self.results, [])

    def test_removed_target(self) -> None:
        """
        A removed target's probe is abandoned and its result dropped.
        """
        prober = FakeProber()
        checker = self.make(prober, active__healthy__interval=5)
        self.clock.advance(5)
        del self.states[KEYS[0]]
        checker.sync()
        self.assertEqual(prober.cancelled, [KEYS[0]])
        prober.answer(Outcome.status(500))
        self.assertEqual(self.results, [(5, KEYS[1], Outcome.status(500))])


# The real prober, against loopback servers.


class _Health(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.lost: defer.Deferred[None] = defer.Deferred()

    def render_GET(self, request: Request) -> bytes | int:
        self.requests.append(request)
        if request.path == b"/bad":
            request.setResponseCode(500)
        elif request.path == b"/busy":
            request.setResponseCode(429)
            request.setHeader("Retry-After", "7")
        elif request.path == b"/stream":
            # An endless body: the probe must not wait for its end.
            request.write(b"data: 1\n\n")
            request.notifyFinish().addErrback(lambda f: self.lost.callback(None))
            return NOT_DONE_YET
        return b"ok"


class AgentProberTests(TestCase):
    """
    L{AgentProber} on real sockets.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor as _reactor

        reactor: Any = _reactor
        self.reactor = reactor
        self.resource = _Health()
        site = Site(self.resource)
        site.log = lambda request: None  # type: ignore[method-assign]
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.key = f"127.0.0.1:{self.port.getHost().port}"
        self.prober = AgentProber(reactor)

    def probe(self, key: str | None = None, **checks: Any) -> defer.Deferred[Outcome]:
        return self.prober.probe(upstream(**checks), target(key or self.key))

    def test_interface(self) -> None:
        verifyObject(IProber, self.prober)

    @defer.inlineCallbacks
    def test_http(self) -> Any:
        outcome = yield self.probe(
            active__http_path="/health", active__headers={"x-probe": "yes"}
        )
        self.assertEqual(outcome, Outcome.status(200))
        [request] = self.resource.requests
        self.assertEqual(request.path, b"/health")
        self.assertEqual(request.getHeader("host"), self.key)
        self.assertEqual(request.getHeader("x-probe"), "yes")
        self.assertEqual(
            (yield self.probe(active__http_path="/bad")), Outcome.status(500)
        )
        self.assertEqual(
            (yield self.probe(active__http_path="/busy")), Outcome.status(429, "7")
        )

    @defer.inlineCallbacks
    def test_host_header(self) -> Any:
        u = attrs.evolve(upstream(), host_header="api.example.com")
        yield self.prober.probe(u, target(self.key))
        port = self.port.getHost().port
        self.assertEqual(
            self.resource.requests[0].getHeader("host"), f"api.example.com:{port}"
        )

    @defer.inlineCallbacks
    def test_endless_body(self) -> Any:
        outcome = yield self.probe(active__http_path="/stream")
        self.assertEqual(outcome, Outcome.status(200))
        yield self.resource.lost

    @defer.inlineCallbacks
    def test_tcp(self) -> Any:
        self.assertEqual((yield self.probe(active__type="tcp")), Outcome.connected())

    @defer.inlineCallbacks
    def test_closed_port(self) -> Any:
        port = self.reactor.listenTCP(
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        closed = f"127.0.0.1:{port.getHost().port}"
        yield port.stopListening()
        for kind in ["http", "tcp"]:
            try:
                yield self.probe(closed, active__type=kind)
            except Exception:
                self.assertEqual(outcome_of_failure(Failure()), Outcome.tcp_failure())
            else:
                self.fail("a probe of a closed port succeeded")


class HostHeaderTests(SynchronousTestCase):
    def test_default_ports(self) -> None:
        self.assertEqual(host_header("a.example", 80, "http"), "a.example")
        self.assertEqual(host_header("a.example", 443, "https"), "a.example")
        self.assertEqual(host_header("a.example", 443, "http"), "a.example:443")
        self.assertEqual(host_header("::1", 8080, "http"), "[::1]:8080")


def _certificate(name: str) -> tuple[bytes, bytes]:
    """
    A self-signed certificate for C{name} and its key, in PEM.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


class HTTPSProberTests(TestCase):
    """
    L{AgentProber} over TLS: SNI, and certificates checked or not.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor as _reactor
        from twisted.internet import ssl

        reactor: Any = _reactor
        cert, key = _certificate("api.example.com")
        options = ssl.PrivateCertificate.loadPEM(cert + key).options()
        self.names: list[bytes | None] = []
        options.getContext().set_tlsext_servername_callback(
            lambda connection: self.names.append(connection.get_servername())
        )
        site = Site(_Health())
        site.log = lambda request: None  # type: ignore[method-assign]
        port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.key = f"127.0.0.1:{port.getHost().port}"
        self.reactor = reactor
        self.trusted = AgentProber(reactor, ssl.Certificate.loadPEM(cert))

    def probe(self, prober: AgentProber, **checks: Any) -> defer.Deferred[Outcome]:
        return prober.probe(upstream(active__type="https", **checks), target(self.key))

    @defer.inlineCallbacks
    def test_verified(self) -> Any:
        outcome = yield self.probe(self.trusted, active__https_sni="api.example.com")
        self.assertEqual(outcome, Outcome.status(200))
        self.assertEqual(self.names, [b"api.example.com"])

    @defer.inlineCallbacks
    def test_wrong_name(self) -> Any:
        try:
            yield self.probe(self.trusted, active__https_sni="other.example.com")
        except Exception:
            self.assertEqual(outcome_of_failure(Failure()), Outcome.tcp_failure())
        else:
            self.fail("a certificate for another name was accepted")

    @defer.inlineCallbacks
    def test_unverified(self) -> Any:
        """
        With verification off an untrusted certificate is accepted, and SNI
        is still sent.
        """
        prober = AgentProber(self.reactor)
        outcome = yield self.probe(
            prober,
            active__https_sni="api.example.com",
            active__https_verify_certificate=False,
        )
        self.assertEqual(outcome, Outcome.status(200))
        self.assertEqual(self.names, [b"api.example.com"])
