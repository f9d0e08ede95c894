# -*- test-case-name: tests.test_feed -*-
"""
One call in flight, shared by everyone who asks for it meanwhile.

A database that stops answering holds a call for as long as the network
takes to say so.  If every admin call, status probe and change-feed look
queued a call of its own behind it, the queue would grow for the whole
outage; sharing the one in flight keeps it at one, and each caller can
still give up waiting (cancel its own L{Deferred}) without cancelling the
call the others wait on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class InFlight(Generic[T]):
    """
    Calls C{call} when asked, unless a call is already in flight, in which
    case the asker gets that call's outcome.
    """

    def __init__(self, call: Callable[[], Deferred[T]]) -> None:
        self._call = call
        self._waiters: list[Deferred[T]] | None = None

    def __call__(self) -> Deferred[T]:
        """
        The outcome of the call in flight (started now if there is none),
        on a L{Deferred} of the caller's own: cancelling it cancels only
        the caller's wait.
        """
        waiter: Deferred[T] = Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        self._call().addBoth(self._done)
        return waiter

    def _done(self, result: T | Failure) -> None:
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            # (A waiter that gave up has been cancelled: Deferred ignores
            # the late result.)
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
