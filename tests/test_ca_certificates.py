"""
CA certificates: a service whose https targets have certificates signed by
a private CA trusts that CA (its C{ca_certificates}) instead of the
system's store.  Real parts: TLS targets on loopback with certificates a
CA made here signs, a real gateway, the Admin API over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any

import pytest
import pytest_twisted
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor, ssl
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from aigateway.cacerts import CATrust, cert_digest, check_cert, service_trusts
from aigateway.config import ConfigSnapshot, empty_records
from aigateway.records import build_record

from .gatewaykit import Gateway, TargetResource, log_events
from .tlskit import certificate, repeated_extension_ca, signed

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:OpenSSL.*")


@pytest.fixture(autouse=True)
def system_store_only(monkeypatch: Any) -> None:
    """
    The process's trust store is the system's: no C{SSL_CERT_FILE} left
    by the environment makes the test CAs trusted by every service.
    """
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def _target(servers: list[Any], issuer: tuple[bytes, bytes], name: str) -> int:
    """
    A TLS target on 127.0.0.1 whose certificate C{issuer} signed; it
    answers with C{name}.
    """
    cert, key = signed(issuer, "127.0.0.1")
    options = ssl.PrivateCertificate.loadPEM(cert + key).options()
    port = reactor.listenSSL(
        0, Site(TargetResource(name)), options, interface="127.0.0.1"
    )
    servers.append(port)
    return int(port.getHost().port)


async def _service(node: Gateway, name: str, port: int, **fields: Any) -> None:
    """
    A service on C{https://127.0.0.1:port} (no retries: one attempt, one
    connection) and a route on C{/name}.
    """
    form = {"name": name, "url": f"https://127.0.0.1:{port}", "retries": "0"}
    reply = await node.admin.post("/services", form={**form, **fields})
    assert reply.code == 201, reply.body
    route = {"paths[]": f"/{name}"}
    reply = await node.admin.post(f"/services/{name}/routes", form=route)
    assert reply.code == 201, reply.body


async def _add_ca(node: Gateway, cert: bytes, **fields: Any) -> dict[str, Any]:
    reply = await node.admin.post(
        "/ca_certificates", form={"cert": cert.decode(), **fields}
    )
    assert reply.code == 201, reply.body
    record: dict[str, Any] = reply.json
    return record


def _digest(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()


@pytest_twisted.ensureDeferred
async def test_a_service_trusts_its_ca_certificates(gateway, servers):
    """
    Without the CA, the target's certificate is refused (502); with the CA
    in the service's C{ca_certificates}, the request goes through, and
    taking it away refuses it again.
    """
    ca = certificate("Private CA")
    port = _target(servers, ca, "private")
    await _service(gateway, "private", port)
    assert (await gateway.proxy.get("/private")).code == 502

    record = await _add_ca(gateway, ca[0], **{"tags[]": "internal"})
    assert record["cert"] == ca[0].decode()
    assert record["cert_digest"] == _digest(ca[0])
    assert record["tags"] == ["internal"]
    assert set(record) == {
        "id",
        "cert",
        "cert_digest",
        "tags",
        "created_at",
        "updated_at",
    }
    patched = await gateway.admin.patch(
        "/services/private", form={"ca_certificates[]": record["id"]}
    )
    assert patched.code == 200, patched.body
    assert patched.json["ca_certificates"] == [record["id"]]
    reply = await gateway.proxy.get("/private")
    assert (reply.code, reply.body) == (200, b"private")

    cleared = await gateway.admin.patch(
        "/services/private", json_body={"ca_certificates": None}
    )
    assert cleared.json["ca_certificates"] is None
    assert (await gateway.proxy.get("/private")).code == 502


@pytest_twisted.ensureDeferred
async def test_pem_texts_openssl_would_not_read_are_trusted(gateway, servers):
    """
    A PEM that passes the check but that OpenSSL's own reader refuses
    (indented lines, a YAML folded block's spaces for its line breaks) is
    trusted as well, rather than stored and then unloadable: that
    configuration could not be put in force, nor undone, nor loaded by a
    restart.
    """
    ca = certificate("Indented CA")
    port = _target(servers, ca, "indented")
    await _service(gateway, "indented", port)
    pem = ca[0].decode()
    for text in (
        "".join("    " + line for line in pem.splitlines(keepends=True)),
        pem.replace("\n", " "),
    ):
        reply = await gateway.admin.put(
            "/ca_certificates/6f1c55d6-5a3b-4d5e-9d1e-3f0b9c1f2a44",
            json_body={"cert": text},
        )
        assert reply.code in (200, 201), reply.body
        patched = await gateway.admin.patch(
            "/services/indented", json_body={"ca_certificates": [reply.json["id"]]}
        )
        assert patched.code == 200, patched.body
        reply = await gateway.proxy.get("/indented")
        assert (reply.code, reply.body) == (200, b"indented")


@pytest_twisted.ensureDeferred
async def test_connections_are_never_lent_across_ca_sets(gateway, servers):
    """
    Two services to the same target: one trusting its CA, one another CA,
    one the system's store.  Once the first has a connection pooled, the
    others still open their own, and still refuse the certificate; and
    the first still reuses its connection.
    """
    right, wrong = certificate("Right CA"), certificate("Wrong CA")
    port = _target(servers, right, "shared")
    good = await _add_ca(gateway, right[0])
    bad = await _add_ca(gateway, wrong[0])
    await _service(gateway, "good", port, **{"ca_certificates[]": good["id"]})
    await _service(gateway, "bad", port, **{"ca_certificates[]": bad["id"]})
    await _service(gateway, "system", port)
    # Two CAs, the right one among them, verify too.
    both = {"ca_certificates[]": [bad["id"], good["id"]]}
    await _service(gateway, "both", port, **both)

    for _ in range(2):
        reply = await gateway.proxy.get("/good")
        assert (reply.code, reply.body) == (200, b"shared")
        assert (await gateway.proxy.get("/bad")).code == 502
        assert (await gateway.proxy.get("/system")).code == 502
        assert (await gateway.proxy.get("/both")).code == 200


@pytest_twisted.ensureDeferred
async def test_refused_input_changes_nothing(gateway, servers):
    """
    Not PEM, a broken PEM, a certificate that is not a CA, two
    certificates in one field, a key pasted along: each a schema
    violation naming C{cert}.  The same CA twice is a unique violation.
    A service naming an unknown CA, or not a UUID, is refused, and so is
    deleting a CA a service still trusts.  Nothing stored changes.
    """
    admin = gateway.admin
    ca = certificate("Some CA")
    other = certificate("Other CA")
    leaf = signed(ca, "model.internal")
    refused = {
        "hello": "invalid certificate: no PEM CERTIFICATE found",
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n": (
            "invalid certificate: could not parse certificate"
        ),
        leaf[0].decode(): (
            "certificate does not appear to be a CA because it is missing "
            'the "CA" basic constraint'
        ),
        (ca[0] + other[0]).decode(): "please submit only one certificate at a time",
        (ca[0] + ca[1]).decode(): (
            "invalid certificate: expected a PEM CERTIFICATE, found PRIVATE KEY"
        ),
    }
    refused[repeated_extension_ca().decode()] = (
        "invalid certificate: could not parse its extensions"
    )
    refused["x" * 65537] = "invalid certificate: longer than 65536 characters"
    for cert, message in refused.items():
        reply = await admin.post("/ca_certificates", form={"cert": cert})
        assert reply.code == 400, reply.body
        assert reply.json["code"] == 2
        assert reply.json["name"] == "schema violation"
        assert reply.json["fields"] == {"cert": message}
        assert reply.json["message"] == f"schema violation (cert: {message})"
    missing = await admin.post("/ca_certificates", form={})
    assert missing.json["fields"] == {"cert": "required field missing"}
    assert (await admin.get("/ca_certificates")).json == {"data": [], "next": None}

    record = await _add_ca(gateway, ca[0])
    again = await admin.post("/ca_certificates", form={"cert": ca[0].decode()})
    assert again.code == 409
    assert again.json["code"] == 5
    assert record["id"] in again.json["message"]
    # A client's cert_digest is not taken.
    given = {"cert": other[0].decode(), "cert_digest": "0" * 64}
    made = await admin.post("/ca_certificates", json_body=given)
    assert made.json["cert_digest"] == _digest(other[0])
    assert (await admin.delete(f"/ca_certificates/{made.json['id']}")).code == 204
    # A PATCH to a bad cert keeps the stored one.
    bad_patch = await admin.patch(
        f"/ca_certificates/{record['id']}", form={"cert": leaf[0].decode()}
    )
    assert bad_patch.code == 400 and list(bad_patch.json["fields"]) == ["cert"]
    # PUT to a name: a CA certificate has none.
    named = await admin.put("/ca_certificates/my-ca", form={"cert": ca[0].decode()})
    assert named.code == 400
    assert named.json["fields"] == {"id": "expected a valid UUID"}

    port = _target(servers, ca, "t")
    await _service(gateway, "svc", port)
    before = (await admin.get("/services/svc")).json
    unknown = "6f1c55d6-5a3b-4d5e-9d1e-3f0b9c1f2a44"
    reply = await admin.patch("/services/svc", form={"ca_certificates[]": unknown})
    assert reply.code == 400
    assert reply.json["code"] == 4
    assert reply.json["name"] == "foreign key violation"
    assert reply.json["fields"] == {"ca_certificates": {"id": unknown}}
    assert unknown in reply.json["message"]
    reply = await admin.post(
        "/services",
        form={"name": "new", "host": "x", "ca_certificates[]": unknown},
    )
    assert reply.code == 400 and reply.json["code"] == 4
    reply = await admin.patch("/services/svc", form={"ca_certificates[]": "nope"})
    assert reply.code == 400
    assert reply.json["fields"] == {"ca_certificates": "expected a valid UUID"}
    assert (await admin.get("/services/svc")).json == before
    assert (await admin.get("/services/new")).code == 404

    ok = await admin.patch("/services/svc", form={"ca_certificates[]": record["id"]})
    assert ok.code == 200
    reply = await admin.delete(f"/ca_certificates/{record['id']}")
    assert reply.code == 400
    assert reply.json == {
        "code": 4,
        "name": "foreign key violation",
        "message": "an existing 'services' entity references this "
        "'ca_certificates' entity",
        "fields": {"@referenced_by": "services"},
    }
    assert (await admin.get(f"/ca_certificates/{record['id']}")).json == record
    assert (await gateway.proxy.get("/svc")).code == 200

    # No longer trusted: it may go.
    await admin.patch("/services/svc", form={"ca_certificates": ""})
    assert (await admin.delete(f"/ca_certificates/{record['id']}")).code == 204
    assert (await admin.get(f"/ca_certificates/{record['id']}")).code == 404


@pytest_twisted.ensureDeferred
async def test_listing_pages_and_tags(gateway):
    """
    C{GET /ca_certificates} pages and filters by tag as the other kinds'
    lists do; one is read, replaced and updated by id.
    """
    admin = gateway.admin
    made = []
    for tags in (["a"], ["a", "b"], ["b"]):
        made.append(await _add_ca(gateway, certificate("CA")[0], **{"tags[]": tags}))
    # Oldest first, by id within one second, as the other kinds list.
    listed = [r["id"] for r in sorted(made, key=lambda r: (r["created_at"], r["id"]))]
    page = (await admin.get("/ca_certificates?size=2")).json
    assert [r["id"] for r in page["data"]] == listed[:2]
    rest = (await admin.get(page["next"])).json
    assert [r["id"] for r in rest["data"]] == listed[2:]
    assert rest["next"] is None
    tagged = (await admin.get("/ca_certificates?tags=a,b")).json["data"]
    assert [r["id"] for r in tagged] == [made[1]["id"]]
    either = (await admin.get("/ca_certificates?tags=a/b")).json["data"]
    assert len(either) == 3

    first = made[0]["id"]
    reply = await admin.patch(f"/ca_certificates/{first}", form={"tags[]": "c"})
    assert reply.json["tags"] == ["c"]
    assert reply.json["cert_digest"] == made[0]["cert_digest"]
    fresh = certificate("Replacement CA")[0]
    reply = await admin.put(f"/ca_certificates/{first}", form={"cert": fresh.decode()})
    assert reply.code == 200
    assert (reply.json["cert_digest"], reply.json["tags"]) == (_digest(fresh), None)
    new_id = "0b0e5f43-8f71-4b58-8d52-5a2b7a0b9e11"
    reply = await admin.put(
        f"/ca_certificates/{new_id}", form={"cert": certificate("CA")[0].decode()}
    )
    assert (reply.code, reply.json["id"]) == (200, new_id)


@pytest_twisted.ensureDeferred
async def test_declarative_round_trip(tmp_path, servers):
    """
    A document's top-level C{ca_certificates}, named by id from a
    service, load at start (C{--config}) and through C{POST /config}; the
    export loads back to the same export; an unknown id is refused whole.
    """
    ca = certificate("Declared CA")
    port = _target(servers, ca, "declared")
    ca_id = "3d1c6a1e-2b8c-4f0a-9a55-6c2d1b7e8f90"
    document = {
        "_format_version": "3.0",
        "ca_certificates": [{"id": ca_id, "cert": ca[0].decode(), "tags": ["x"]}],
        "services": [
            {
                "name": "declared",
                "url": f"https://127.0.0.1:{port}",
                "retries": 0,
                "ca_certificates": [ca_id],
                "routes": [{"name": "declared", "paths": ["/declared"]}],
            }
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    node = await Gateway(str(tmp_path / "d.db"), config=str(path)).start()
    try:
        reply = await node.proxy.get("/declared")
        assert (reply.code, reply.body) == (200, b"declared")
        first = await node.admin.get("/config?format=json")
        exported = first.json
        assert exported["ca_certificates"] == [
            {
                "id": ca_id,
                "cert": ca[0].decode(),
                "cert_digest": _digest(ca[0]),
                "tags": ["x"],
            }
        ]
        assert exported["services"][0]["ca_certificates"] == [ca_id]
        yaml_export = (await node.admin.get("/config")).body

        wiped = await node.admin.post("/config", body=b"_format_version: '3.0'\n")
        assert wiped.code == 201
        assert "ca_certificates" not in wiped.json
        assert (await node.admin.get("/ca_certificates")).json["data"] == []

        loaded = await node.admin.post("/config", json_body=exported)
        assert loaded.code == 201, loaded.body
        assert (await node.admin.get("/config?format=json")).json == exported
        assert (await node.admin.get("/config")).body == yaml_export
        reply = await node.proxy.get("/declared")
        assert (reply.code, reply.body) == (200, b"declared")

        broken = {**exported, "ca_certificates": []}
        bad = await node.admin.post("/config", json_body=broken)
        assert bad.code == 400
        assert bad.json["fields"]["errors"] == [
            f"services[0].ca_certificates[0]: {ca_id} does not reference an "
            "existing 'ca_certificates' entity"
        ]
        leaf = signed(ca, "x")[0].decode()
        bad = await node.admin.post(
            "/config",
            json_body={**exported, "ca_certificates": [{"cert": leaf}]},
        )
        assert bad.code == 400
        assert bad.json["fields"]["errors"][0].startswith(
            "ca_certificates[0].cert: certificate does not appear to be a CA"
        )
        assert (await node.admin.get("/config?format=json")).json == exported
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_kept_across_restarts(tmp_path, servers, database):
    """
    On SQLite and PostgreSQL, CA certificates and the services' references
    are stored: a restarted gateway trusts them at once, and still refuses
    to delete one in use.
    """
    ca = certificate("Stored CA")
    port = _target(servers, ca, "stored")
    node = await Gateway(database).start()
    try:
        record = await _add_ca(node, ca[0])
        await _service(node, "stored", port, **{"ca_certificates[]": record["id"]})
        assert (await node.proxy.get("/stored")).code == 200
    finally:
        await node.stop()

    again = await Gateway(database).start()
    try:
        assert (await again.admin.get(f"/ca_certificates/{record['id']}")).json == (
            record
        )
        service = (await again.admin.get("/services/stored")).json
        assert service["ca_certificates"] == [record["id"]]
        reply = await again.proxy.get("/stored")
        assert (reply.code, reply.body) == (200, b"stored")
        refused = await again.admin.delete(f"/ca_certificates/{record['id']}")
        assert refused.code == 400 and refused.json["code"] == 4
    finally:
        await again.stop()


@pytest_twisted.ensureDeferred
async def test_a_database_from_before_opens(tmp_path, servers):
    """
    A database written before CA certificates existed (services without
    the field, no such rows) opens as it was, and its services take CA
    certificates.
    """
    path = str(tmp_path / "old.db")
    node = await Gateway(path).start()
    ca = certificate("Later CA")
    port = _target(servers, ca, "old")
    try:
        await _service(node, "old", port)
    finally:
        await node.stop()
    # What the gateway of before stored: no "ca_certificates" in a service.
    with sqlite3.connect(path) as db:
        (data,) = db.execute("SELECT data FROM entities WHERE kind = 'services'")
        stored = json.loads(data[0])
        del stored["ca_certificates"]
        db.execute(
            "UPDATE entities SET data = ? WHERE kind = 'services'",
            (json.dumps(stored),),
        )

    again = await Gateway(path).start()
    try:
        assert (await again.admin.get("/ca_certificates")).json["data"] == []
        # Shown with its default, as every field of the schema in force.
        service = (await again.admin.get("/services/old")).json
        assert "ca_certificates" in service and service["ca_certificates"] is None
        assert (await again.proxy.get("/old")).code == 502
        record = await _add_ca(again, ca[0])
        reply = await again.admin.patch(
            "/services/old", form={"ca_certificates[]": record["id"]}
        )
        assert reply.code == 200, reply.body
        assert (await again.proxy.get("/old")).code == 200
    finally:
        await again.stop()


class CheckTests(SynchronousTestCase):
    """
    What may be stored, and the trust each service gets from it.
    """

    def test_cert_digest_is_of_the_der(self) -> None:
        pem = certificate("CA")[0]
        self.assertIsNone(check_cert(pem.decode()))
        # Text around the PEM block (as openssl x509 -text prints) is not
        # part of the certificate.
        self.assertEqual(cert_digest("subject=CN = CA\n" + pem.decode()), _digest(pem))

    def test_only_https_verified_services_get_a_trust(self) -> None:
        ca = certificate("CA")[0].decode()
        record, errors = build_record("ca_certificates", {"cert": ca}, False)
        self.assertEqual(errors, {})
        record["id"] = "c1"
        cas = {"c1": record}

        def service(id: str, **fields: Any) -> dict[str, Any]:
            return {"id": id, "protocol": "https", "ca_certificates": ["c1"], **fields}

        trusts = service_trusts(
            [
                service("https"),
                service("again"),
                service("plain", protocol="http"),
                service("unverified", tls_verify=False),
                service("none", ca_certificates=None),
                service("gone", ca_certificates=["c2"]),
            ],
            cas,
        )
        self.assertEqual(set(trusts), {"https", "again", "gone"})
        self.assertIs(trusts["https"], trusts["again"])
        self.assertEqual(trusts["https"].digests, (record["cert_digest"],))
        # A reference to nothing trusts nothing, never the system's store.
        self.assertEqual(trusts["gone"].digests, ())
        self.assertIsNotNone(trusts["gone"].root)

    def test_a_stored_certificate_that_cannot_be_loaded_is_not_trusted(self) -> None:
        """
        A stored C{cert} that no longer loads (a store edited by hand, a
        check that changed) leaves its service trusting less, and the
        configuration still builds: a snapshot that cannot be built would
        stop every node sharing the store.
        """
        cas = {"c1": {"id": "c1", "cert": "not a certificate", "cert_digest": "d"}}
        service = {"id": "s", "protocol": "https", "ca_certificates": ["c1"]}
        with log_events("aigateway.cacerts") as logged:
            trusts = service_trusts([service], cas)
        self.assertEqual(trusts["s"].digests, ("d",))
        self.assertEqual(len(logged), 1)
        self.assertIn("cannot be loaded", logged[0]["log_format"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_snapshot_services_carry_their_trust(self) -> None:
        ca = certificate("CA")[0].decode()
        record, _ = build_record("ca_certificates", {"cert": ca}, False)
        record["id"] = "c1"
        service, errors = build_record(
            "services",
            {"host": "h", "protocol": "https", "ca_certificates": [_UUID]},
            False,
        )
        self.assertEqual(errors, {})
        service["id"] = "s1"
        records = empty_records()
        records["ca_certificates"] = {_UUID: {**record, "id": _UUID}}
        records["services"] = {"s1": service}
        snapshot = ConfigSnapshot.build(1, records)
        trust = snapshot.services["s1"].ca_trust
        self.assertIsInstance(trust, CATrust)
        # The same certificates in another snapshot: an equal trust, so
        # pooled connections stay usable across configuration changes.
        later = ConfigSnapshot.build(2, records).services["s1"].ca_trust
        self.assertEqual(trust, later)
        self.assertEqual(hash(trust), hash(later))


_UUID = "9a7e2f3c-1d4b-4c6e-8f0a-2b3c4d5e6f70"
