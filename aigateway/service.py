# -*- test-case-name: tests.test_admin,tests.test_proxy -*-
"""
The gateway as a Twisted service: store, runtime, proxy and Admin API.

Start-up is ordered: the store is opened and migrated, the configuration
loaded and put in force, and only then do the listeners open, so the first
proxied request already sees the stored configuration.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from .admin.site import AdminSite
from .feed import ConfigFeed
from .proxy.client import Agents
from .proxy.server import ProxyFactory
from .runtime import Runtime
from .store import open_store
from .store.interfaces import StoreUnavailable

_log = Logger()


BACKLOG = 1024


def with_backlog(spec: str) -> str:
    """
    A TCP or TLS endpoint string with a listen backlog of L{BACKLOG} unless
    it names one.

    Twisted's default backlog is 50: a burst of 100 new clients (an agent
    fanning out, a load balancer reconnecting) overflows it, and each
    dropped SYN costs its client a one-second retransmit.
    """
    kind = spec.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl", "reuseport") and "backlog=" not in spec:
        return f"{spec}:backlog={BACKLOG}"
    return spec


@attrs.frozen
class Settings:
    """
    What the command line (or a test) chose.
    """

    proxy: str = "tcp:8000"
    admin: str = "tcp:8001:interface=127.0.0.1"
    database: str = "aigateway.db"
    config: str | None = None
    access_log: str | None = None
    max_body: int = 16 * 1024 * 1024
    latency_headers: bool = True
    metrics: bool = True
    trust_forwarded_for: bool = False
    #: Seconds between looks for configuration written by other processes
    #: sharing the store (0: never look).
    db_update_frequency: float = 1.0
    #: Seconds a stopping node lets the requests in progress finish.
    drain_timeout: float = 30.0


class GatewayService(MultiService):
    """
    One gateway node.

    @ivar ready: fires when the listeners are open (or fails if start-up
        failed); tests and embedders wait on it.
    @ivar proxy_port: the proxy's listening port, once ready.
    @ivar admin_port: the Admin API's listening port, once ready.
    """

    def __init__(
        self, reactor: Any, settings: Settings, exit_on_failure: bool = False
    ) -> None:
        """
        @param exit_on_failure: stop the reactor when start-up fails, so a
            twistd process with a bad configuration exits instead of idling
            without listeners.
        """
        super().__init__()
        self._exit_on_failure = exit_on_failure
        from .wiring import build

        self.reactor = reactor
        self.settings = settings
        self.node_id = str(uuid.uuid4())
        self.started_at = reactor.seconds()
        self.store = open_store(reactor, settings.database)
        self.agents = Agents(reactor)
        self._proxy_factory: ProxyFactory | None = None
        self.parts = build(reactor, self)
        self.runtime: Runtime = self.parts.runtime
        self.ready: Deferred[None] = Deferred()
        self.proxy_port: IListeningPort | None = None
        self.admin_port: IListeningPort | None = None
        self.feed: ConfigFeed | None = None
        if settings.db_update_frequency > 0:
            self.feed = ConfigFeed(
                reactor, self.parts.entities.refresh, settings.db_update_frequency
            )

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self._start())
        d.addErrback(self._start_failed)
        d.chainDeferred(self.ready)

    async def _start(self) -> None:
        await self.store.start()
        version, records = await self.store.load()
        self.runtime.apply_stored(version, records)
        if self.settings.config:
            await self.parts.load_declarative(self.settings.config)
            _log.info(
                "loaded declarative configuration {path}", path=self.settings.config
            )
        proxy = self._proxy_factory = ProxyFactory(
            self.parts.proxy_resource, self.settings.max_body, self.reactor
        )
        admin = AdminSite(self.parts.admin_resource)
        self.proxy_port = await serverFromString(
            self.reactor, with_backlog(self.settings.proxy)
        ).listen(proxy)
        self.admin_port = await serverFromString(
            self.reactor, self.settings.admin
        ).listen(admin)
        if self.feed is not None:
            self.feed.start()
        _log.info(
            "aigateway {node} ready: proxy on {proxy}, Admin API on {admin}, "
            "configuration version {version}",
            node=self.node_id,
            proxy=self.proxy_port.getHost(),
            admin=self.admin_port.getHost(),
            version=version,
        )

    @property
    def open_connections(self) -> int:
        """
        Client connections open to the proxy.
        """
        factory = self._proxy_factory
        return factory.open_connections if factory is not None else 0

    @property
    def requests_in_flight(self) -> int:
        """
        Requests the proxy is serving now.
        """
        factory = self._proxy_factory
        return factory.requests_in_flight if factory is not None else 0

    def _start_failed(self, failure: Any) -> Any:
        if failure.check(CannotListenError, StoreUnavailable):
            # An operator's mistake, not a bug: one line says it.
            _log.critical(
                "aigateway could not start: {error}", error=failure.getErrorMessage()
            )
        else:
            _log.failure("aigateway could not start", failure)
        if self._exit_on_failure and self.reactor.running:
            # twistd exits 0 once its reactor stops; a supervisor (systemd,
            # Kubernetes) must see a failure, to restart or report it.
            atexit.register(_exit_failed)
            self.reactor.stop()
        return failure

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        stops: list[Deferred[Any]] = []
        # Both ports are let go at once, so a node started in this one's
        # place can bind them while this one drains.
        for port in (self.proxy_port, self.admin_port):
            if port is not None:
                result = port.stopListening()
                if isinstance(result, Deferred):
                    stops.append(result)
        factory = self._proxy_factory
        if factory is not None and self.proxy_port is not None:
            _log.info(
                "stopping: finishing the requests in progress (at most {timeout} s)",
                timeout=self.settings.drain_timeout,
            )
            drained = factory.drain(self.settings.drain_timeout)
            if self._exit_on_failure:  # (its own process: twistd's)
                _on_second_signal(self.reactor, factory.cut_short)
        else:
            drained = succeed(None)
        # The rest waits for the drain: the answers in progress still need
        # the target connections, and the configuration in force.
        drained.addCallback(lambda _: self._stop_parts())
        stops.append(drained)
        return DeferredList(stops, consumeErrors=True)

    def _stop_parts(self) -> Deferred[Any]:
        stops: list[Deferred[Any]] = []
        if self.feed is not None:
            self.feed.stop()
        stops.append(self.agents.close())

        def configuration_settled(_: object) -> Deferred[None]:
            # Nothing puts a configuration in force from here on (that
            # would start health checks again), and the store is closed
            # only once no call on it is in progress.
            self.parts.stop()
            return self.store.close()

        # (A database that does not answer is not waited on for more than a
        # few seconds: the node is closed, so a late answer is not put in
        # force anyway; a write it answers late is stored, and the next
        # start loads it.)
        settled = self.parts.entities.close().addTimeout(5, self.reactor)
        stops.append(settled.addBoth(configuration_settled))
        return DeferredList(stops, consumeErrors=True)


def _on_second_signal(reactor: Any, cut_short: Callable[[], object]) -> None:
    """
    While draining, let a second C{SIGTERM} or C{SIGINT} (a second Ctrl-C)
    cut the drain short, instead of the reactor's handler failing to stop a
    reactor already stopping.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # (signal handlers are the main thread's to set)

    def again(signum: int, frame: object) -> None:
        reactor.callFromThread(cut_short)

    for signum in (signal.SIGTERM, signal.SIGINT):
        with suppress(ValueError, OSError):
            signal.signal(signum, again)


def _exit_failed() -> None:
    """
    End a process whose gateway could not start with status 1, once twistd
    has shut down (pid file removed, log closed).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
