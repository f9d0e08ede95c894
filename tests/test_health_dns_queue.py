"""
Tests for how L{aigateway.health.dns.NameLookups} spends the reactor's
threads: at most L{LOOKUPS_AT_ONCE} lookups out, the others queued in
order and timed only once sent; one lookup per name, whichever targets
use it; refreshes spread at random.

The system resolver runs on the thread pool the proxy's own lookups need,
so these are what keep a configuration of many names from starving the
proxy; they are tested here with a L{task.Clock} and a resolver that holds
its answers until the test releases them (no proxy, no threads).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from aigateway.health.dns import (
    LOOKUP_JITTER,
    LOOKUP_REFRESH,
    LOOKUP_TIMEOUT,
    LOOKUPS_AT_ONCE,
)
from aigateway.health.state import DNS_RETRY

from .healthkit import Names, snapshot, target, target_record, upstream_record
from .test_health_dns import LookupMixin

#: More names than may be out at once.
MANY = 4 * LOOKUPS_AT_ONCE + 1


def _names(count: int) -> list[str]:
    return [f"n{i:02d}.test" for i in range(count)]


def _answers(count: int) -> dict[str, list[str]]:
    return {name: [f"10.2.0.{i}"] for i, name in enumerate(_names(count))}


def _keys(count: int) -> dict[str, int]:
    return {f"{name}:443": 100 for name in _names(count)}


class CapTests(LookupMixin, SynchronousTestCase):
    """
    However many names there are, at most L{LOOKUPS_AT_ONCE} lookups are
    out; the rest wait in the order their targets were added.
    """

    def test_at_most_n_out(self) -> None:
        self.make(Names(_answers(MANY), hold=True))
        self.config(1, _keys(MANY))
        self.assertEqual(self.names.asked, _names(LOOKUPS_AT_ONCE))
        while self.names.held:
            self.assertLessEqual(len(self.names.held), LOOKUPS_AT_ONCE)
            # Answers in any order: each frees a place for the next.
            self.names.release(self.names.held[-1][0])
        self.assertEqual(self.names.asked, _names(MANY))
        self.assertEqual({self.health(k) for k in _keys(MANY)}, {"HEALTHCHECKS_OFF"})
        self.assertEqual(
            self.addresses(f"n{MANY - 1:02d}.test:443"), (f"10.2.0.{MANY - 1}",)
        )

    def test_queued_is_not_timed_out(self) -> None:
        """
        A lookup's L{LOOKUP_TIMEOUT} runs from when it is sent: one that
        waited in the queue is not failed for the wait.
        """
        count = LOOKUPS_AT_ONCE + 1
        last = f"n{count - 1:02d}.test:443"
        self.make(Names(_answers(count), hold=True))
        self.config(1, _keys(count))
        self.clock.advance(LOOKUP_TIMEOUT - 1)
        for name in _names(LOOKUPS_AT_ONCE):
            self.names.release(name)
        self.assertEqual(self.names.asked, _names(count))  # sent now, at 9
        self.clock.advance(LOOKUP_TIMEOUT - 1)
        self.assertEqual(self.health(last), "DNS_PENDING")
        self.clock.advance(1)
        self.assertEqual(self.health(last), "DNS_ERROR")
        self.assertEqual(self.health("n00.test:443"), "HEALTHCHECKS_OFF")

    def test_hung_lookups_keep_their_places(self) -> None:
        """
        A lookup past its timeout still holds a thread, and its place,
        until it answers: hung names fail, the others wait (pending, not
        failed), and the resolver is not asked more.
        """
        self.make(Names(_answers(MANY), hold=True))
        self.config(1, _keys(MANY))
        self.clock.pump([DNS_RETRY] * 6)
        self.assertEqual(self.names.asked, _names(LOOKUPS_AT_ONCE))
        self.assertEqual(self.health("n00.test:443"), "DNS_ERROR")
        self.assertEqual(self.health(f"n{MANY - 1:02d}.test:443"), "DNS_PENDING")
        self.names.release("n00.test")
        self.assertEqual(self.health("n00.test:443"), "HEALTHCHECKS_OFF")
        self.assertEqual(len(self.names.asked), LOOKUPS_AT_ONCE + 1)

    def test_forgotten_while_queued_or_out(self) -> None:
        """
        A name whose targets are gone is passed over in the queue; one
        whose lookup is out keeps its place until the lookup answers.
        """
        count = LOOKUPS_AT_ONCE + 2
        self.make(Names(_answers(count), hold=True))
        self.config(1, _keys(count))
        kept = f"n{count - 1:02d}.test:443"
        self.config(2, {kept: 100})
        self.assertEqual(len(self.names.held), LOOKUPS_AT_ONCE)
        self.names.release("n00.test")
        self.assertEqual(self.names.asked[-1], f"n{count - 1:02d}.test")
        self.names.release()
        self.assertEqual(self.health(kept), "HEALTHCHECKS_OFF")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # its refresh

    def test_stop_empties_the_queue(self) -> None:
        self.make(Names(_answers(MANY), hold=True))
        self.config(1, _keys(MANY))
        self.manager.stop()
        self.names.release()
        self.assertEqual(self.names.asked, _names(LOOKUPS_AT_ONCE))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SharedNameTests(LookupMixin, SynchronousTestCase):
    """
    A name is looked up once for every target that uses it, in one
    upstream or several, on any port, in any case, and its answer is every
    one's.
    """

    KEYS = (("api.test:443", "u1"), ("api.test:80", "u1"), ("API.test:443", "u2"))

    def configure(self, version: int, *extra: tuple[str, str]) -> None:
        self.manager.update(
            snapshot(
                version,
                [upstream_record("u1"), upstream_record("u2")],
                [target_record(key, uid) for key, uid in self.KEYS + extra],
            )
        )

    def shown(self, *extra: tuple[str, str]) -> list[tuple[str, tuple[str, ...]]]:
        return [
            (
                self.manager.describe(target(key, uid))["health"],
                self.manager.addresses(target(key, uid)),
            )
            for key, uid in self.KEYS + extra
        ]

    def test_one_lookup(self) -> None:
        self.make(Names({"api.test": ["10.1.0.1"]}, hold=True))
        self.configure(1)
        self.assertEqual(self.names.asked, ["api.test"])
        self.assertEqual(self.shown(), [("DNS_PENDING", ())] * 3)
        self.names.release()
        self.assertEqual(self.shown(), [("HEALTHCHECKS_OFF", ("10.1.0.1",))] * 3)
        self.clock.advance(LOOKUP_REFRESH)
        self.assertEqual(len(self.names.asked), 2)
        del self.names.answers["api.test"]
        self.names.release()
        self.assertEqual(self.shown(), [("DNS_ERROR", ())] * 3)
        self.clock.advance(DNS_RETRY)
        self.assertEqual(len(self.names.asked), 3)

    def test_new_target_takes_the_last_answer(self) -> None:
        self.make(Names({"api.test": ["10.1.0.1"]}))
        self.configure(1)
        self.clock.advance(1)
        more = ("api.test:8080", "u2")
        self.configure(2, more)
        self.assertEqual(self.names.asked, ["api.test"])
        self.assertEqual(self.shown(more)[-1], ("HEALTHCHECKS_OFF", ("10.1.0.1",)))
        self.clock.advance(LOOKUP_REFRESH - 1)  # still one schedule
        self.assertEqual(self.names.asked, ["api.test"] * 2)

    def test_one_target_failed_by_the_proxy(self) -> None:
        """
        A proxied attempt that failed to resolve the name takes out only
        its own target; the name's next lookup comes L{DNS_RETRY} later,
        not a refresh later, and brings it back.
        """
        manager = self.make(Names({"api.test": ["10.1.0.1"]}))
        self.configure(1)
        self.clock.advance(1)
        manager.report_failure(target("api.test:80"), timeout=False, dns=True)
        self.assertEqual(
            [h for h, _ in self.shown()],
            ["HEALTHCHECKS_OFF", "DNS_ERROR", "HEALTHCHECKS_OFF"],
        )
        self.clock.advance(DNS_RETRY)
        self.assertEqual(len(self.names.asked), 2)
        self.assertEqual(self.shown(), [("HEALTHCHECKS_OFF", ("10.1.0.1",))] * 3)


class JitterTests(LookupMixin, SynchronousTestCase):
    def test_refreshes_spread(self) -> None:
        """
        Each answer draws how early its name's next refresh comes, up to
        L{LOOKUP_JITTER} of L{LOOKUP_REFRESH}: names looked up together
        are not refreshed together.
        """
        draws = iter([1.0, 0.0, 0.5])
        self.make(Names(_answers(2)), jitter=lambda: next(draws))
        self.config(1, _keys(2))
        self.assertEqual(self.names.asked, ["n00.test", "n01.test"])
        self.clock.advance(LOOKUP_REFRESH * (1 - LOOKUP_JITTER))
        self.assertEqual(self.names.asked[2:], ["n00.test"])
        self.clock.advance(LOOKUP_REFRESH * LOOKUP_JITTER)
        self.assertEqual(self.names.asked[2:], ["n00.test", "n01.test"])


class ScheduleTests(LookupMixin, SynchronousTestCase):
    def test_failed_by_the_proxy_just_before_a_refresh(self) -> None:
        """
        A target taken out by a proxied attempt just before its name's
        refresh: the refresh gives way to the target's next try, a
        L{DNS_RETRY} after the attempt.
        """
        manager = self.make(Names({"api.test": ["10.1.0.1"]}))
        self.config(1)
        self.clock.advance(LOOKUP_REFRESH - 1)
        manager.report_failure(target("api.test:443"), timeout=False, dns=True)
        self.clock.advance(1)
        self.assertEqual(len(self.names.asked), 1)
        self.clock.advance(DNS_RETRY - 1)
        self.assertEqual(len(self.names.asked), 2)
        self.assertEqual(self.health("api.test:443"), "HEALTHCHECKS_OFF")
