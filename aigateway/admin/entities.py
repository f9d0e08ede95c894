# -*- test-case-name: tests.test_admin,tests.test_feed_hang -*-
"""
Create, read, update and delete entities, without HTTP.

Writes are serialised by one L{DeferredLock}: each validates against the
configuration in force, commits one store transaction, and only then puts
a new snapshot in force, so a failed write leaves both the store and the
running gateway as they were.

Other gateway processes may share the store.  A write commits only if the
stored configuration is still the version it was validated against; when
it is not, the stored configuration is loaded and put in force, and the
write is validated and tried again (while its caller still waits for
it), so a name taken on another node is refused here too and no change
made there is overwritten.
"""

from __future__ import annotations

import copy
import random
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from contextlib import suppress
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..addresses import format_target, parse_target
from ..config import ConfigSnapshot, Records
from ..declarative import keep_secrets
from ..feed import Outage
from ..ids import is_uuid
from ..inflight import InFlight
from ..records import (
    PARENT,
    SCHEMAS,
    SERVER_FIELDS,
    UNIQUE,
    build_record,
    parent_id,
    stamp,
)
from ..runtime import Runtime
from ..schema import merge
from ..store.interfaces import IStore, StaleConfiguration, StoreUnavailable
from .errors import (
    AdminError,
    foreign_key_violation,
    not_found,
    schema_violation,
    unique_violation,
    write_unanswered,
)

Record = dict[str, Any]

_log = Logger()

# Writes tried against a configuration that other processes keep changing
# before one is let fail.
_ATTEMPTS = 10

# The kind of entity that owns each nested kind.
_OWNER = {"targets": "upstreams", "routes": "services"}

# Seconds a look at the store may go unanswered before the store is taken
# to be out of reach.  It is the Admin API's own wait (FreshResource), so
# the metric and the log call the store unavailable when an admin write is
# refused for it; it does not grow with the change feed's interval, which
# says how often to look, not how long one look may take.
PATIENCE = 2.0

# Seconds a write may wait (for the write before it, then for the store)
# before its caller is answered that the store did not answer in time.
# Longer than PATIENCE: a write on a busy database server takes longer
# than a look, and may wait for another node's (PostgreSQL's lock_timeout
# is 5 s), and an answer given too soon is one the client cannot act on.
WRITE_PATIENCE = 10.0


class Entities:
    """
    The Admin API's view of the configuration.

    @cvar write_patience: seconds a write may go unanswered
        (L{WRITE_PATIENCE}); tests lower it.
    """

    write_patience = WRITE_PATIENCE

    def __init__(
        self, store: IStore, runtime: Runtime, clock: Any, patience: float = PATIENCE
    ) -> None:
        """
        @param patience: seconds a look at the store may go unanswered
            before the store is taken to be out of reach (L{PATIENCE}).
        """
        self._store = store
        self._runtime = runtime
        self._clock = clock
        self._patience = patience
        #: Told the outcome of every call on the store, and of a look that
        #: goes unanswered: the node's one record of whether the store
        #: answers.
        self.outage = Outage()
        self._lock = DeferredLock()
        self._closed = False
        self._look = InFlight(self._watched_look)

    @property
    def snapshot(self) -> ConfigSnapshot:
        """
        The configuration in force.
        """
        return self._runtime.snapshot

    def find(self, kind: str, ref: str, parent: str | None = None) -> Record:
        """
        The record of kind C{kind} addressed by id or unique name.

        @param parent: the owning upstream's id, for targets.
        @raise AdminError: 404 when there is none.
        """
        records = self.snapshot.records[kind]
        if ref in records:
            found = records[ref]
            if parent is None or parent_id(kind, found) == parent:
                return dict(found)
        key = UNIQUE[kind]
        if kind == "targets":
            parsed = parse_target(ref)
            ref = format_target(*parsed) if parsed else ref
        for record in records.values():
            if record.get(key) == ref and (
                parent is None or parent_id(kind, record) == parent
            ):
                return dict(record)
        raise not_found()

    def list(self, kind: str, parent: str | None = None) -> list[Record]:
        """
        Every record of a kind (of one parent), oldest first.
        """
        records = [
            r
            for r in self.snapshot.records[kind].values()
            if parent is None or parent_id(kind, r) == parent
        ]
        records.sort(key=lambda r: (r.get("created_at") or 0, r["id"]))
        return [dict(r) for r in records]

    def create(
        self,
        kind: str,
        data: Mapping[str, Any],
        coerce: bool,
        parent: str | None = None,
    ) -> Deferred[Record]:
        """
        Validate and store a new entity.
        """
        return self._locked(self._create, kind, dict(data), coerce, parent)

    def create_or_update(
        self,
        kind: str,
        data: Mapping[str, Any],
        coerce: bool,
        parent: str | None = None,
    ) -> Deferred[tuple[Record, bool]]:
        """
        POST that updates: when an entity with the same unique key exists
        (a target posted again, as Kong's documentation does to change a
        weight), merge C{data} into it instead of failing.

        @return: the record, and whether it was created.
        """

        def run() -> Deferred[tuple[Record, bool]]:
            key = data.get(UNIQUE[kind])
            old = None
            if isinstance(key, str):
                with suppress(AdminError):
                    old = self.find(kind, key, parent)
            if old is None:
                created = self._create(kind, dict(data), coerce, parent)
                return created.addCallback(lambda record: (record, True))
            saved = self._patch(kind, old, data, coerce, parent)
            return saved.addCallback(lambda record: (record, False))

        return self._locked(run)

    def update(
        self,
        kind: str,
        ref: str,
        data: Mapping[str, Any],
        coerce: bool,
        parent: str | None = None,
    ) -> Deferred[Record]:
        """
        PATCH: deep-merge C{data} into the entity (records merge; arrays
        and maps are replaced).
        """

        def patch() -> Deferred[Record]:
            return self._patch(kind, self.find(kind, ref, parent), data, coerce, parent)

        return self._locked(patch)

    def _patch(
        self,
        kind: str,
        old: Record,
        data: Mapping[str, Any],
        coerce: bool,
        parent: str | None,
    ) -> Deferred[Record]:
        given = {k: v for k, v in old.items() if k not in SERVER_FIELDS}
        if (
            kind == "upstreams"
            and "algorithm" not in data
            and data.get("hash_on") not in (None, "none")
            and given.get("algorithm") == "round-robin"
        ):
            # As on create: hashing asked of an upstream on the default
            # algorithm implies consistent hashing.
            del given["algorithm"]
        merged = merge(SCHEMAS[kind], given, _without_server_fields(data))
        return self._save(kind, merged, coerce, parent, old)

    def upsert(
        self,
        kind: str,
        ref: str,
        data: Mapping[str, Any],
        coerce: bool,
        parent: str | None = None,
    ) -> Deferred[Record]:
        """
        PUT: replace the entity addressed by C{ref} (omitted fields go back
        to their defaults), or create it with that name or id.
        """

        def put() -> Deferred[Record]:
            body = _without_server_fields(data)
            try:
                old: Record | None = self.find(kind, ref, parent)
            except AdminError:
                old = None
            if old is None:
                if is_uuid(ref):
                    body["id"] = ref
                elif kind == "ca_certificates":
                    # Nothing names a CA certificate: its digest is made
                    # from its cert, and cannot be chosen in the URL.
                    raise schema_violation({"id": "expected a valid UUID"})
                else:
                    body.setdefault(UNIQUE[kind], ref)
                return self._create(kind, body, coerce, parent)
            if not is_uuid(ref):
                body.setdefault(UNIQUE[kind], ref)
            return self._save(kind, body, coerce, parent, old)

        return self._locked(put)

    def delete(self, kind: str, ref: str, parent: str | None = None) -> Deferred[None]:
        """
        Delete an entity; an upstream takes its targets with it, and a
        service still used by routes, or a CA certificate still trusted by
        a service, is refused.
        """

        def remove() -> Deferred[None]:
            record = self.find(kind, ref, parent)
            deletes = [(kind, record["id"])]
            if kind == "upstreams":
                deletes += [
                    ("targets", t["id"]) for t in self.list("targets", record["id"])
                ]
            if kind == "services" and self.list("routes", record["id"]):
                raise foreign_key_violation(
                    "an existing 'routes' entity references this 'services' entity",
                    {"@referenced_by": "routes"},
                )
            if kind == "ca_certificates" and any(
                record["id"] in (s.get("ca_certificates") or ())
                for s in self.snapshot.records["services"].values()
            ):
                raise foreign_key_violation(
                    "an existing 'services' entity references this "
                    "'ca_certificates' entity",
                    {"@referenced_by": "services"},
                )
            return self._commit([], deletes).addCallback(lambda _: None)

        return self._locked(remove)

    def _locked(
        self,
        function: Callable[..., Deferred[Any]],
        *args: Any,
        bounded: bool = True,
    ) -> Deferred[Any]:
        """
        Run C{function} (which validates and commits) alone, again after
        loading the stored configuration when another process wrote first,
        and answer within L{write_patience} (see L{_bounded}).

        Each attempt gets its own copy of C{args}: an attempt may change
        what it was given (a create takes the C{id} out of its data), and
        the next must start from what the client sent.

        A write is tried again only while its caller waits for it.  One
        whose caller was answered without its outcome (told it may or may
        not have been saved, and to read it back) and that then meets
        another node's change is let fail: tried again, it would be
        validated and committed on top of a configuration its caller never
        saw, and overwrite that change (which may be the caller's own,
        made on another node after reading back).

        @param bounded: whether the caller is answered within
            L{write_patience}; start-up's C{--config} waits for the store
            instead, as long as it takes (a slow store is not a reason not
            to start, when the write lands all the same).
        """
        write = _Write()

        async def run() -> Any:
            write.started = True
            for attempt in range(_ATTEMPTS):
                if self._closed:
                    raise StoreUnavailable("this node is shutting down")
                if write.answered:  # (only ever after a StaleConfiguration)
                    raise StoreUnavailable(
                        "the configuration was changed on another node first, "
                        "and the write was not tried again on top of it: its "
                        "caller had been answered already"
                    )
                try:
                    result = await function(*copy.deepcopy(args))
                except StaleConfiguration:
                    # Another node won the race: let the nodes drift apart
                    # before loading its change and trying again, so that
                    # two of them do not keep meeting.
                    await deferLater(
                        self._clock,
                        random.uniform(0, 0.01 * (attempt + 1)),
                        lambda: None,
                    )
                    await self._outcome(self._reload())
                except StoreUnavailable:
                    self.outage.failed(Failure())
                    raise
                else:
                    self.outage.answered()
                    return result
            raise StoreUnavailable(
                f"the configuration kept changing on other nodes "
                f"({_ATTEMPTS} attempts); try again"
            )

        work = self._lock.run(lambda: Deferred.fromCoroutine(run()))
        return self._bounded(work, write) if bounded else work

    def _bounded(self, work: Deferred[Any], write: _Write) -> Deferred[Any]:
        """
        The outcome of C{work}, or, once L{write_patience} has passed,
        L{write_unanswered}: a store that accepts a connection and never
        answers would otherwise keep the caller waiting for ever.

        A write still waiting for the one before it is dropped (its caller
        is told nothing changed).  One in the store is left to finish: its
        transaction may be committed already, or be about to be, and only
        its own answer can say; when it comes it is put in force as any
        write's, so the store and the gateway agree (and the lock keeps
        every other write behind it until then).  Its caller is told it
        may or may not have been saved, and the log says which once it is
        known; it is not tried again (see L{_locked}).  The same holds for
        a caller that stops waiting (an Admin API client that hangs up).
        """

        def cancel(_: Deferred[Any]) -> None:
            write.answered = True
            if timer.active():
                timer.cancel()
            if not write.started:
                work.cancel()

        result: Deferred[Any] = Deferred(cancel)

        def give_up() -> None:
            write.answered = True
            reached = write.started
            result.errback(write_unanswered(self.write_patience, reached))
            if reached:
                silent = StoreUnavailable(
                    f"a write had no answer within {self.write_patience:g} s"
                )
                self.outage.failed(Failure(silent))
            else:
                work.cancel()

        timer = self._clock.callLater(self.write_patience, give_up)

        def done(outcome: Any) -> None:
            if not result.called:
                if timer.active():
                    timer.cancel()
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)
            elif not isinstance(outcome, Failure):
                if self._closed:
                    _log.info(
                        "a write its caller no longer waited for was saved after "
                        "all, once this node had closed: the next start puts it "
                        "in force"
                    )
                else:
                    _log.info(
                        "a write its caller no longer waited for was saved after "
                        "all (configuration version {version})",
                        version=self.snapshot.version,
                    )
            elif outcome.check(AdminError, StoreUnavailable):
                _log.info(
                    "a write its caller no longer waited for was not saved: {error}",
                    error=outcome.value,
                )
            elif not outcome.check(CancelledError):
                _log.failure("a write its caller no longer waited for failed", outcome)

        work.addBoth(done)
        return result

    def refresh(self) -> Deferred[bool]:
        """
        Put the stored configuration in force if another process changed
        it (the change feed and every admin call ask for this).

        Callers that ask while a look at the store is in progress share
        it: a store that does not answer holds one look, not one per
        caller, and each caller may give up waiting on its own.

        @return: a L{Deferred} firing with whether it changed.
        """
        return self._look()

    def _watched_look(self) -> Deferred[bool]:
        """
        Look at the store once (after the write or look in progress), and
        record an outage if the look has not answered within the patience.

        A database server that stops answering (stopped, or cut off without
        a reset) holds a look for as long as the network takes to say so:
        minutes, and for ever for a stopped server on a healthy network.
        The look goes on (its late answer is put in force, and ends the
        outage), but the outage is recorded now.  The wait for the lock is
        timed too: a write that hangs on the store holds the look behind it.
        """
        look = self._lock.run(lambda: Deferred.fromCoroutine(self._refresh()))
        silence = self._clock.callLater(self._patience, self._unanswered)

        def answered(result: Any) -> Any:
            if silence.active():
                silence.cancel()
            return result

        return look.addBoth(answered)

    def _unanswered(self) -> None:
        self.outage.failed(
            Failure(StoreUnavailable(f"no answer within {self._patience:g} s"))
        )

    async def _refresh(self) -> bool:
        if self._closed:
            return False
        return await self._outcome(self._changed())

    async def _changed(self) -> bool:
        if await self._store.version() == self.snapshot.version:
            return False
        return await self._reload()

    async def _outcome(self, look: Coroutine[Any, Any, bool]) -> bool:
        """
        Tell the outage watcher how a look at the store went.
        """
        try:
            changed = await look
        except Exception:
            self.outage.failed(Failure())
            raise
        self.outage.answered()
        return changed

    def close(self) -> Deferred[None]:
        """
        Take no more calls, and put nothing more in force, so a stopped
        node's health checks stay stopped (a write the store answers from
        now on is stored only: the next start loads it); fire once the call
        in progress (a write, a look at the store) is over.
        """
        self._closed = True
        return self._lock.run(lambda: succeed(None))

    async def _reload(self) -> bool:
        old = self.snapshot.version
        version, records = await self._store.load()
        if version == old or self._closed:
            return False
        self._runtime.apply_stored(version, records)
        _log.info(
            "configuration version {version} loaded from the store "
            "(was {old}: changed by another node)",
            version=version,
            old=old,
        )
        return True

    def _create(
        self, kind: str, data: Record, coerce: bool, parent: str | None
    ) -> Deferred[Record]:
        given_id = data.pop("id", None)
        data.pop("created_at", None)
        data.pop("updated_at", None)
        if given_id is not None:
            if not is_uuid(given_id):
                raise schema_violation({"id": "expected a valid UUID"})
            # Ids are unique across kinds: the store keys every record by
            # its id alone.
            taken = [
                k for k, records in self.snapshot.records.items() if given_id in records
            ]
            if taken:
                hint = (
                    "use PATCH or PUT to change it"
                    if kind in taken
                    else f"it is one of the {taken[0]}"
                )
                raise unique_violation(kind, "id", given_id, hint)
        now = self._now(kind)
        old = {"id": given_id or str(uuid.uuid4()), "created_at": now}
        return self._save(kind, data, coerce, parent, old)

    def _save(
        self, kind: str, data: Record, coerce: bool, parent: str | None, old: Record
    ) -> Deferred[Record]:
        if parent is not None:
            if parent not in self.snapshot.records[_OWNER[kind]]:
                # The owner named in the URL was there when the call began
                # and is gone now: deleted on another node while this
                # write waited its turn.  The URL no longer names anything.
                raise not_found()
            data[PARENT[kind]] = {"id": parent}
        if kind == "routes":
            self._resolve_service(data)
        if kind == "targets" and isinstance(data.get("headers"), Mapping):
            # A target read (credentials masked) and written back keeps its
            # credentials, not their masks.
            data["headers"] = keep_secrets(data["headers"], old.get("headers"))
        record, errors = build_record(kind, data, coerce)
        if errors:
            raise schema_violation(errors)
        record["id"] = old["id"]
        record["created_at"] = old["created_at"]
        record["updated_at"] = self._now(kind)
        self._check_references(kind, record)
        self._check_unique(kind, record)
        return self._commit([(kind, record)], []).addCallback(lambda _: record)

    def _resolve_service(self, data: Record) -> None:
        ref = data.get("service")
        if not isinstance(ref, Mapping):
            if ref is None:
                raise schema_violation({"service": "required field missing"})
            raise schema_violation({"service": "expected a record"})
        if "name" in ref and "id" not in ref:
            try:
                data["service"] = {"id": self.find("services", str(ref["name"]))["id"]}
            except AdminError:
                raise foreign_key_violation(
                    f"the foreign key '{{name=\"{ref['name']}\"}}' does not reference an "
                    "existing 'services' entity.",
                    {"service": {"name": ref["name"]}},
                ) from None

    def _check_references(self, kind: str, record: Record) -> None:
        if kind == "services":
            self._check_ca_certificates(record)
        parent_kind = _OWNER.get(kind)
        if parent_kind is None:
            return
        owner = parent_id(kind, record)
        if owner is None:
            raise schema_violation({PARENT[kind]: "required field missing"})
        if owner not in self.snapshot.records[parent_kind]:
            raise foreign_key_violation(
                f"the foreign key '{{id=\"{owner}\"}}' does not reference an "
                f"existing '{parent_kind}' entity.",
                {PARENT[kind]: {"id": owner}},
            )

    def _check_ca_certificates(self, record: Record) -> None:
        """
        A service trusts CA certificates that exist: one that names a
        missing id would otherwise trust nothing, and fail every request.
        """
        stored = self.snapshot.records["ca_certificates"]
        for id in record.get("ca_certificates") or ():
            if id not in stored:
                raise foreign_key_violation(
                    f"the foreign key '{{id=\"{id}\"}}' does not reference an "
                    "existing 'ca_certificates' entity.",
                    {"ca_certificates": {"id": id}},
                )

    def _check_unique(self, kind: str, record: Record) -> None:
        key = UNIQUE[kind]
        value = record.get(key)
        if value is None:
            return
        # Targets are unique within their upstream; route names, like every
        # other name, across the gateway (as Kong's), since /routes/{name}
        # must address one route.
        scoped = kind == "targets"
        scope = parent_id(kind, record)
        for other in self.snapshot.records[kind].values():
            if (
                other["id"] != record["id"]
                and other.get(key) == value
                and (not scoped or parent_id(kind, other) == scope)
            ):
                if kind == "targets":
                    hint = f"use PATCH /upstreams/{{upstream}}/targets/{value} to change it"
                elif kind == "ca_certificates":
                    hint = f"this certificate is stored already, as {other['id']}"
                else:
                    hint = (
                        f"use PATCH /{kind}/{value} or PUT /{kind}/{value} to change it"
                    )
                raise unique_violation(kind, key, value, hint)

    def _commit(
        self, puts: Sequence[tuple[str, Record]], deletes: Sequence[tuple[str, str]]
    ) -> Deferred[Any]:
        records = {kind: dict(by_id) for kind, by_id in self.snapshot.records.items()}
        for kind, record in puts:
            records[kind][record["id"]] = record
        for kind, id in deletes:
            records[kind].pop(id, None)

        snapshot = self._loadable(records)
        expected = self.snapshot.version
        d = self._store.write(puts, deletes, expected)
        return d.addCallback(self._in_force, snapshot)

    def _loadable(self, records: Records) -> ConfigSnapshot:
        """
        Refuse a change the gateway could not put in force (see
        L{Runtime.check}) before anything is stored.

        @return: what it puts in force once stored (L{_in_force}).
        @raise AdminError: a 500 saying nothing was changed.
        """
        try:
            return self._runtime.check(records)
        except Exception:
            _log.failure("a change that passed the checks cannot be put in force")
            raise AdminError(
                500,
                {
                    "message": "An unexpected error occurred: the change cannot "
                    "be put in force, and nothing was changed"
                },
            ) from None

    def _in_force(self, version: int, snapshot: ConfigSnapshot) -> None:
        """
        Put in force the configuration a write just stored (built before
        it was, by L{_loadable}), unless this node is closed: a write the
        store answers after L{close} (which stops waiting for it after a
        while, see the service's stop) is stored, and the next start loads
        it; put in force now, it would start health checks again on a
        stopped node.
        """
        if not self._closed:
            self._runtime.apply_checked(version, snapshot)

    def replace(
        self,
        build: Callable[[Records], Mapping[str, Mapping[str, Record]]],
        bounded: bool = True,
    ) -> Deferred[None]:
        """
        Replace the whole configuration (declarative import) in one
        transaction.

        @param build: makes the new records from the ones in force (a
            masked credential keeps its stored secret); called again when
            another node changed the configuration first.
        @param bounded: whether to answer within L{write_patience} (an
            Admin API call), or wait for the store (start-up's
            C{--config}, see L{_locked}).
        """

        def swap() -> Deferred[None]:
            records = build(self.snapshot.records)
            snapshot = self._loadable(records)
            expected = self.snapshot.version
            d = self._store.replace(records, expected)
            return d.addCallback(self._in_force, snapshot)

        return self._locked(swap, bounded=bounded)

    def _now(self, kind: str) -> float:
        return stamp(kind, self._clock.seconds())


@attrs.define
class _Write:
    """
    How far one write has gone, as its attempts (L{Entities._locked}) and
    the wait for it (L{Entities._bounded}) both need to know.

    @ivar started: it holds the lock: it is in the store, or about to be.
    @ivar answered: its caller was answered before it was over (it timed
        out, or the caller stopped waiting), so it is not tried again.
    """

    started: bool = False
    answered: bool = False


def _without_server_fields(data: Mapping[str, Any]) -> Record:
    return {k: v for k, v in data.items() if k not in ("created_at", "updated_at")}
