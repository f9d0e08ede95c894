# -*- test-case-name: tests.test_feed -*-
"""
The change feed: configuration written by other gateway processes, put in
force here.

Several processes can share one store: one per core on a C{reuseport:}
port over one SQLite file, or one per machine over PostgreSQL.  Each
serves from its own in-memory snapshot, so each must learn of the others'
writes.  The feed asks the store for its configuration version every
C{interval} seconds (one small query, on the database thread) and loads
the whole configuration only when the version moved, as Kong's
C{db_update_frequency} does.  Polling rather than a notification keeps one
mechanism for every store, and a process that was cut off from the
database catches up on its next successful look.

The proxy never waits on the feed: it keeps serving from the snapshot in
force, and a store that does not answer is logged once, not per look.  A
look that does not answer at all (a database server stopped, or cut off
without a reset) holds the feed: no other look is queued behind it, and
the node's L{Outage} is told once it has gone unanswered for a couple of
seconds (L{aigateway.admin.entities.PATIENCE}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .store.interfaces import StoreUnavailable

_log = Logger()


class Outage:
    """
    The store's being out of reach, logged once per outage (its first
    failure or first look left unanswered, then its recovery) however many
    looks and admin calls meet it meanwhile.  A failure that is not an outage (a record this node cannot
    read, say) is logged every time: it will not go away by waiting.

    @ivar failing: the store is out of reach: the last look at it failed.
    """

    def __init__(self) -> None:
        self.failing = False

    def answered(self) -> None:
        """
        A look at the store succeeded.
        """
        if self.failing:
            self.failing = False
            _log.info("the configuration store answers again")

    def failed(self, failure: Failure) -> None:
        """
        A look at the store failed with C{failure}.
        """
        if not failure.check(StoreUnavailable):
            _log.failure("could not load the stored configuration", failure)
            return
        if self.failing:
            return
        self.failing = True
        _log.warn(
            "the configuration store is unavailable ({error}); serving the "
            "configuration in force until it answers",
            error=failure.value,
        )


class ConfigFeed:
    """
    Calls C{refresh} every C{interval} seconds, one call at a time.
    """

    def __init__(
        self,
        clock: Any,
        refresh: Callable[[], Deferred[bool]],
        interval: float,
    ) -> None:
        """
        @param refresh: loads and puts in force the stored configuration if
            its version moved; fires with whether it did (and reports a
            failed or unanswered look itself, to the node's L{Outage}).
        @param interval: seconds between looks (more than 0).
        """
        if interval <= 0:
            raise ValueError("the feed's interval must be more than 0")
        self._refresh = refresh
        self._interval = interval
        self._loop = LoopingCall(self._look)
        self._loop.clock = clock

    def start(self) -> None:
        """
        Start looking (the first look after one interval: start-up has just
        loaded the configuration).
        """
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        """
        Stop looking.
        """
        if self._loop.running:
            self._loop.stop()

    def _look(self) -> Deferred[None]:
        # LoopingCall waits for this Deferred before scheduling the next
        # look, so looks never overlap; it must not fail, or the loop ends.
        return self._refresh().addCallbacks(_ignore, _ignore)


def _ignore(_: object) -> None:
    pass
