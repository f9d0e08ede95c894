"""
The lean epoll reactor: it dispatches like Twisted's, survives handlers
that raise, and is what C{twistd aigateway} runs unless told otherwise.
"""

import os
import subprocess
import sys
from pathlib import Path

from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from aigateway.reactor import LeanEPollReactor

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


class _Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class _Client(Protocol):
    def __init__(self, reactor, got):
        self._reactor = reactor
        self._got = got

    def connectionMade(self):
        self.transport.write(b"ping")

    def dataReceived(self, data):
        self._got.append(data)
        self._reactor.stop()


class _Exploding(FileDescriptor):
    """
    The read end of a pipe whose connectionLost raises: an exception that
    escapes the reactor's own handling of the event.
    """

    def __init__(self, reactor, fd):
        super().__init__(reactor)
        self._fd = fd
        self.lost = 0

    def fileno(self):
        return self._fd

    def logPrefix(self):
        return "exploding"

    def doRead(self):
        os.read(self._fd, 100)
        return Exception("read: disconnect me")

    def connectionLost(self, reason):
        self.lost += 1
        raise RuntimeError("connectionLost blew up")


def _readable(case, kind):
    """
    A lean reactor with a reader of C{kind} on a pipe that has a byte to
    read: C{(reactor, the read end, the reader)}.
    """
    reactor = LeanEPollReactor()
    read_end, write_end = os.pipe()
    case.addCleanup(os.close, write_end)
    reader = kind(reactor, read_end)
    reactor.addReader(reader)
    os.write(write_end, b"x")
    return reactor, read_end, reader


def _later_events_handled(reactor, read_end):
    """
    Run C{reactor} for 0.1 s, then close C{read_end}: what a call made
    after the reader's event saw (C{[True]} when it ran).
    """
    later = []
    reactor.callLater(0.05, later.append, True)
    reactor.callLater(0.1, reactor.stop)
    _run(reactor)
    os.close(read_end)
    return later


def _run(reactor, timeout=5.0):
    reactor.callLater(timeout, reactor.stop)
    reactor.run(installSignalHandlers=False)


class LeanEPollReactorTests(SynchronousTestCase):
    def test_round_trip(self):
        """
        A TCP exchange over loopback works as on the stock reactor.
        """
        reactor = LeanEPollReactor()
        port = reactor.listenTCP(0, Factory.forProtocol(_Echo), interface="127.0.0.1")
        got = []
        factory = ClientFactory.forProtocol(lambda: _Client(reactor, got))
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        _run(reactor)
        self.assertEqual(got, [b"ping"])

    def test_escaping_exception_logged_loop_goes_on(self):
        """
        An exception that escapes the event's handling is logged with the
        selectable's prefix, and later events are still handled.
        """
        reactor, read_end, exploding = _readable(self, _Exploding)
        events = []
        log.addObserver(events.append)
        self.addCleanup(log.removeObserver, events.append)
        self.assertEqual(_later_events_handled(reactor, read_end), [True])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(exploding.lost, 1)
        failures = [e for e in events if e.get("isError") and e.get("failure")]
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0]["failure"].check(RuntimeError))
        self.assertEqual(failures[0]["system"], "exploding")


class _Raising(_Exploding):
    """
    A reader whose doRead raises.
    """

    def doRead(self):
        os.read(self._fd, 100)
        raise ValueError("doRead blew up")

    def connectionLost(self, reason):
        self.lost += 1
        self.reason = reason


class LeanEPollReactorReadTests(SynchronousTestCase):
    def test_raising_read_logged_and_disconnected(self):
        """
        A reader whose C{doRead} raises is logged and disconnected with
        that exception, as Twisted's reactors do, and the loop goes on.
        """
        reactor, read_end, raising = _readable(self, _Raising)
        self.assertEqual(_later_events_handled(reactor, read_end), [True])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(raising.lost, 1)
        self.assertTrue(raising.reason.check(ValueError))
        self.assertNotIn(raising, reactor.getReaders())


def _python(code):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
    )


def test_options_install_the_lean_reactor():
    """
    Parsing C{twistd aigateway}'s options installs the lean reactor when
    none is installed yet.
    """
    done = _python(
        "from aigateway.tap import Options; Options().parseOptions([]);"
        "from twisted.internet import reactor; print(type(reactor).__name__)"
    )
    assert done.stdout.strip() == "LeanEPollReactor", done.stderr


def test_chosen_reactor_kept():
    """
    A reactor installed before the options are parsed (twistd --reactor)
    is left in place.
    """
    done = _python(
        "from twisted.internet import selectreactor; selectreactor.install();"
        "from aigateway.tap import Options; Options().parseOptions([]);"
        "from twisted.internet import reactor; print(type(reactor).__name__)"
    )
    assert done.stdout.strip() == "SelectReactor", done.stderr


def test_twistd_lists_the_reactor():
    listed = subprocess.run(
        [str(BIN / "twistd"), "--help-reactors"], capture_output=True, text=True
    )
    assert "aigateway" in listed.stdout
