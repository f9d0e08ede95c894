# -*- test-case-name: tests.test_ca_certificates -*-
"""
CA certificates (Kong's C{ca_certificates}): the private CAs a service
trusts for its targets, instead of the whole process's trust store.

A self-hosted model server behind internal TLS has a certificate signed by
a CA the system does not know.  C{SSL_CERT_FILE} makes the whole process
trust it; a service's C{ca_certificates} make that service trust exactly
those CAs, and nothing else.

Two halves: L{check_cert} and L{cert_digest} for the Admin API and the
declarative loader (what may be stored), and L{CATrust} with
L{service_trusts} for the proxy (what a connection is verified against),
built once per configuration snapshot, never per request.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL.crypto import FILETYPE_ASN1
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.logger import Logger

_log = Logger()

#: The longest C{cert} accepted: a CA certificate's PEM is a few kB.
MAX_CERT = 65536

# Every PEM block's label: a CA certificate is one CERTIFICATE block, and
# anything else (a private key pasted along, a bundle) is refused.
_PEM_LABEL = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")


def _certificate(value: str) -> x509.Certificate:
    """
    The one certificate in C{value}.

    @raise ValueError: with Kong's message for what is wrong.
    """
    labels = _PEM_LABEL.findall(value)
    others = [label for label in labels if label != "CERTIFICATE"]
    if others:
        raise ValueError(
            f"invalid certificate: expected a PEM CERTIFICATE, found {others[0]}"
        )
    if len(labels) > 1:
        raise ValueError("please submit only one certificate at a time")
    if not labels:
        raise ValueError("invalid certificate: no PEM CERTIFICATE found")
    try:
        return x509.load_pem_x509_certificate(value.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ValueError("invalid certificate: could not parse certificate") from None


def check_cert(value: str) -> str | None:
    """
    A check for the C{cert} field: exactly one X.509 certificate, in
    force, of a CA (Kong's rules and messages).  A certificate that is
    not a CA could never sign a target's, so storing it is a mistake the
    client should hear of now, not as a 502 later.
    """
    if len(value) > MAX_CERT:
        return f"invalid certificate: longer than {MAX_CERT} characters"
    try:
        cert = _certificate(value)
    except ValueError as e:
        return str(e)
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
        return 'certificate expired, "Not After" time is in the past'
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        constraints = None
    except Exception:
        # (A malformed or repeated extension: cryptography raises more
        # than ValueError for them.)
        return "invalid certificate: could not parse its extensions"
    if constraints is None or not constraints.value.ca:
        return (
            "certificate does not appear to be a CA because it is missing "
            'the "CA" basic constraint'
        )
    return None


def cert_digest(value: str) -> str:
    """
    Kong's C{cert_digest}: the SHA-256 of the certificate's DER, in hex.
    What identifies a CA certificate, whatever text surrounds its PEM.

    @param value: a C{cert} that passed L{check_cert}.
    """
    return hashlib.sha256(_der(value)).hexdigest()


@attrs.frozen(cache_hash=True)
class CATrust:
    """
    The CAs one service's target connections are verified against.

    Equal, and hashing alike, by the certificates' digests only: pooled
    connections are kept by a key that holds this value, so a connection
    verified against one set of CAs is lent only to requests that trust
    the same set (whichever service or snapshot they come from), never to
    one that trusts other CAs or the system's.

    @ivar digests: the certificates' C{cert_digest}s, sorted.
    @ivar root: the trust root (C{IOpenSSLTrustRoot}) made from them, for
        L{twisted.internet.ssl.optionsForClientTLS}.
    """

    digests: tuple[str, ...]
    root: Any = attrs.field(eq=False, repr=False)


@functools.lru_cache(maxsize=256)
def _trust(certs: tuple[tuple[str, str], ...]) -> CATrust:
    """
    The L{CATrust} of C{(digest, PEM)} pairs, made once for as long as
    the same set is configured: a change to something else makes a new
    snapshot, and the certificates are not parsed again for it.
    """
    loaded = []
    for _, pem in certs:
        try:
            loaded.append(Certificate.load(_der(pem), FILETYPE_ASN1))
        except Exception:
            # Stored before it was checked as now (or edited by hand): left
            # out, so the service trusts less, never the system's store, and
            # the configuration still loads (a snapshot that cannot be built
            # would stop the node, and every node sharing the store).
            _log.failure("a stored CA certificate cannot be loaded; it is not trusted")
    root = trustRootFromCertificates(loaded)
    return CATrust(tuple(digest for digest, _ in certs), root)


def _der(pem: str) -> bytes:
    """
    The certificate in C{pem} as DER, read the way L{check_cert} read it:
    OpenSSL's own PEM reader refuses texts that passed it (indented lines,
    a YAML folded block's spaces for line breaks).
    """
    return _certificate(pem).public_bytes(Encoding.DER)


def service_trusts(
    services: Iterable[Mapping[str, Any]],
    ca_certificates: Mapping[str, Mapping[str, Any]],
) -> dict[str, CATrust]:
    """
    The L{CATrust} of each service whose target connections verify
    against its own CAs: C{https}, C{tls_verify} on, C{ca_certificates}
    set.  Other services are left out (they verify against the system's
    store, or not at all).

    An id that names no stored certificate (the Admin API and the loader
    refuse one, so only a store edited by hand has it) is skipped, never
    replaced by the system's store: a service left with none trusts
    nothing, and its targets fail, as a misconfigured private CA should.

    @param services: service records.
    @param ca_certificates: CA certificate records by id.
    """
    trusts = {}
    for service in services:
        ids = service.get("ca_certificates")
        if (
            not ids
            or service.get("protocol") != "https"
            or not service.get("tls_verify", True)
        ):
            continue
        found = {
            (record["cert_digest"], record["cert"])
            for record in (ca_certificates.get(i) for i in ids)
            if record is not None
        }
        trusts[service["id"]] = _trust(tuple(sorted(found)))
    return trusts
