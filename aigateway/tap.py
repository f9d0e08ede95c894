# -*- test-case-name: tests.test_tap -*-
"""
C{twistd aigateway}: command-line options and the service they build.

This module is imported by the twistd drop-in before the reactor is
installed, so it must not import the reactor (nor klein, nor
C{prometheus_client.twisted}) at module level.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

DEFAULT_PROXY = "tcp:8000"
DEFAULT_ADMIN = "tcp:8001:interface=127.0.0.1"
DEFAULT_DATABASE = "aigateway.db"


# A libpq "key=value ..." connection string, which would otherwise be taken
# for an SQLite file name and start a node on a configuration of its own.
_KEYWORDS = re.compile(
    r"(?:^|\s)(?:host|hostaddr|port|dbname|user|password|sslmode)\s*=", re.IGNORECASE
)


def _size(value: str) -> int:
    size = int(value)
    if size < 0:
        raise ValueError("must not be negative")
    return size


def _seconds(value: str) -> float:
    seconds = float(value)
    if not 0 <= seconds <= 86400:
        raise ValueError("must be between 0 and 86400")
    return seconds


class Options(usage.Options):
    """
    Options of C{twistd aigateway}.
    """

    synopsis = "[options]"
    longdesc = (
        "An event-driven AI gateway: a streaming reverse proxy and load "
        "balancer for LLM providers, configured through a Kong-style Admin API."
    )

    def opt_version(self) -> None:
        """
        Display aigateway's version (and Twisted's) and exit.
        """
        import twisted

        from ._version import __version__

        print(f"aigateway {__version__} (Twisted {twisted.__version__})")
        raise SystemExit(0)

    optParameters = [
        [
            "proxy",
            "p",
            DEFAULT_PROXY,
            "Endpoint the proxy listens on: a Twisted server endpoint string "
            "(tcp:8000:interface=..., ssl:...), or reuseport:PORT[:interface=ADDRESS] "
            "to share the port with other gateway processes.",
        ],
        [
            "admin",
            "a",
            DEFAULT_ADMIN,
            "Endpoint the Admin API listens on; keep it on a private interface.",
        ],
        [
            "database",
            "d",
            DEFAULT_DATABASE,
            "Configuration store: an SQLite file path (created if missing), or "
            "postgresql://user:password@host:5432/dbname for nodes sharing one "
            "configuration.",
        ],
        [
            "config",
            "c",
            None,
            "Declarative YAML configuration loaded at start, replacing the stored one.",
        ],
        [
            "access-log",
            None,
            None,
            "Write one JSON line per proxied request to this file ('-' for stdout).",
        ],
        [
            "max-body",
            None,
            16 * 1024 * 1024,
            "Largest request body the proxy accepts, in bytes.",
            _size,
        ],
        [
            "db-update-frequency",
            None,
            1.0,
            "Seconds between looks for configuration changed by other gateway "
            "processes sharing the database (0: never look).",
            _seconds,
        ],
        [
            "drain-timeout",
            None,
            30.0,
            "On SIGTERM, seconds to let requests in progress (streams included) "
            "finish before they are cut (0: cut at once).",
            _seconds,
        ],
    ]
    optFlags = [
        [
            "no-metrics",
            None,
            "Do not count proxied requests in /metrics (health and connection gauges stay).",
        ],
        [
            "no-latency-headers",
            None,
            "Do not add X-Upstream-Latency and X-Proxy-Latency to responses.",
        ],
        [
            "trust-forwarded-for",
            None,
            "Take the client address from X-Forwarded-For (behind a trusted load balancer).",
        ],
    ]

    def postOptions(self) -> None:
        from twisted.internet.endpoints import _parseServer

        from .reuseport import ReusePortParser

        _default_reactor()

        self._check_database(self["database"])
        if self["config"]:
            self._check_config(self["config"])
        for name in ("proxy", "admin"):
            try:
                parsed = _parseServer(self[name], None)
                if isinstance(parsed[0], ReusePortParser):
                    # Ours checks its arguments now, not when the service
                    # starts (other plugins may need the reactor to).
                    parsed[0].parseStreamServer(None, *parsed[1], **parsed[2])
            except (ValueError, KeyError, TypeError, OSError) as e:
                raise usage.UsageError(
                    f"--{name}: invalid endpoint {self[name]!r}: {e}"
                ) from None

    def _check_database(self, database: str) -> None:
        """
        Refuse a database this gateway cannot open, before anything starts:
        a URL that is not PostgreSQL's, or PostgreSQL without its driver.
        """
        from .store.postgres import connection_settings, is_postgres, redacted

        if is_postgres(database):
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise usage.UsageError(
                    f"--database {redacted(database)}: PostgreSQL needs the "
                    "psycopg driver: pip install 'aigateway[postgres]'"
                ) from None
            try:
                connection_settings(database)
            except ValueError as e:
                raise usage.UsageError(f"--database {e}") from None
        elif _KEYWORDS.search(database):
            # (Not echoed: it may hold a password.)
            raise usage.UsageError(
                "--database: a key=value connection string is not supported: "
                "give PostgreSQL as postgresql://user:password@host:5432/dbname"
            )
        elif "://" in database:
            raise usage.UsageError(
                f"--database {redacted(database)}: not an SQLite file path nor "
                "a postgresql:// URL"
            )

    def _check_config(self, path: str) -> None:
        """
        Refuse an unreadable or invalid declarative file before anything
        starts, with every error listed.
        """
        from . import declarative

        try:
            with open(path, encoding="utf-8") as f:
                document = declarative.parse(f.read())
            declarative.load(document, 0)
        except OSError as e:
            raise usage.UsageError(
                f"--config: cannot read {path}: {e.strerror}"
            ) from None
        except declarative.InvalidDocument as e:
            listed = "\n  ".join(e.errors)
            raise usage.UsageError(
                f"--config: {path} is invalid:\n  {listed}"
            ) from None


def _default_reactor() -> None:
    """
    Install L{aigateway.reactor}'s lean epoll reactor, unless one is
    installed already (C{twistd --reactor NAME} installs its choice while
    parsing the options before ours, and so does a test runner).

    This is the moment twistd itself installs a reactor named with
    C{--reactor}: after the options are read, before the service is made.
    """
    import sys

    if "twisted.internet.reactor" in sys.modules:
        return
    try:
        from .reactor import install
    except ImportError:  # no epoll on this platform: twistd's default
        return
    install()


def makeService(options: Options) -> IService:
    """
    Build the gateway's L{MultiService} from the command line.
    """
    from twisted.internet import reactor

    from .service import GatewayService, Settings

    settings = Settings(
        proxy=options["proxy"],
        admin=options["admin"],
        database=options["database"],
        config=options["config"],
        access_log=options["access-log"],
        max_body=options["max-body"],
        latency_headers=not options["no-latency-headers"],
        metrics=not options["no-metrics"],
        trust_forwarded_for=bool(options["trust-forwarded-for"]),
        db_update_frequency=options["db-update-frequency"],
        drain_timeout=options["drain-timeout"],
    )
    service: Any = GatewayService(reactor, settings, exit_on_failure=True)
    _tune_gc(service)
    return service


def _tune_gc(service: Any) -> None:
    """
    Garbage collection for a long-lived server process.

    The proxy's per-request objects are freed by reference counting (no
    cycles: tests.test_proxy checks it), so collections are rare; but the
    Admin API and Twisted's own machinery do make cycles, and CPython's
    default first-generation threshold (700) would run a collection every
    few requests while they are alive.  Collect less often, and move the
    objects built at start-up (modules, configuration) out of the
    collector's sight so full collections do not scan them.
    """
    import gc

    gc.set_threshold(20_000, 20, 20)
    service.ready.addCallback(lambda _: gc.freeze())
