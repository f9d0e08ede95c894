# -*- test-case-name: tests.test_reactor -*-
"""
The gateway's default reactor: Twisted's epoll reactor without the
per-event logging context.

The stock L{EPollReactor} dispatches every ready descriptor through
L{twisted.python.log.callWithLogger}, which asks the selectable for its
C{logPrefix}, pushes a context dictionary onto a thread-local stack, calls,
and pops it again, so that a legacy C{log.msg} made while handling the event
is tagged with the connection it came from.  A proxied request is two or
three such events, and py-spy put that bookkeeping at about 4% of the
gateway's CPU per request under load.  The gateway logs with
L{twisted.logger}, whose events never read that context, so this reactor
dispatches directly; an exception that escapes the handler is still logged
(as C{callWithLogger} does, with the selectable's prefix) and never stops
the loop.  A descriptor that is only readable, nearly every event on a busy
proxy, goes straight to its C{doRead} (1% of the instructions per request
went to L{_doReadOrWrite}'s sorting of event flags).

C{twistd aigateway} installs it unless a reactor was chosen with
C{--reactor} (or was already installed); it is also a twistd reactor
plugin, C{--reactor aigateway}.
"""

from __future__ import annotations

import errno
import select
import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.python import log

_IN = select.EPOLLIN


class LeanEPollReactor(EPollReactor):
    """
    L{EPollReactor}, dispatching ready descriptors without a logging context.
    """

    def doPoll(self, timeout: float | None) -> None:
        """
        Poll for ready descriptors and handle each (as
        L{EPollReactor.doPoll}, less L{log.callWithLogger}).
        """
        if timeout is None:
            timeout = -1  # Wait indefinitely.
        try:
            ready = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                if event == _IN:
                    # Readable and nothing else, nearly every event on a
                    # busy proxy: what _doReadOrWrite does for it, less its
                    # flag tests and its fileno() look for a closed
                    # descriptor (a closed one is not in the poller).
                    try:
                        why = selectable.doRead()
                        read = True
                    except BaseException:
                        why = sys.exc_info()[1]
                        read = False  # (as _doReadOrWrite has it)
                        log.err()
                    if why:
                        self._disconnectSelectable(selectable, why, read)
                else:
                    # _doReadOrWrite logs what doRead or doWrite raise, and
                    # disconnects the selectable; this catches the rest.
                    handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(system=_prefix(selectable))

    doIteration = doPoll


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except BaseException:
        return "(buggy logPrefix method)"


def install() -> LeanEPollReactor:
    """
    Install a L{LeanEPollReactor} as the global reactor.

    @raise twisted.internet.error.ReactorAlreadyInstalledError: a reactor
        is already installed.
    """
    from twisted.internet.main import installReactor

    reactor = LeanEPollReactor()
    installReactor(reactor)
    return reactor


__all__ = ["LeanEPollReactor", "install"]
