"""
Certificates for TLS tests, made fresh: self-signed, each its own CA
(L{certificate}), and ones a CA of those signs (L{signed}).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def certificate(*names: str) -> tuple[bytes, bytes]:
    """
    A self-signed certificate (its own CA) for C{names}: DNS names, or IP
    addresses.
    """
    return _make(names, None, ca=True)


def signed(issuer: tuple[bytes, bytes], *names: str) -> tuple[bytes, bytes]:
    """
    A certificate for C{names} that is not a CA, signed by C{issuer} (a
    certificate and key from L{certificate}), as a private CA signs a
    model server's.
    """
    return _make(names, issuer, ca=False)


def repeated_extension_ca() -> bytes:
    """
    A CA certificate (PEM) with its basic constraints given twice, which
    X.509 forbids: made with a stand-in extension whose OID is then
    changed in the DER (the signature no longer matches, which reading
    it does not check).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Twice CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    stand_in = x509.ObjectIdentifier("2.5.29.99")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        # SEQUENCE { BOOLEAN TRUE }: basic constraints of a CA, once more.
        .add_extension(x509.UnrecognizedExtension(stand_in, b"0\x03\x01\x01\xff"), True)
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    # 2.5.29.99 and 2.5.29.19 (basicConstraints) encode to as many bytes.
    der = der.replace(b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x13")
    body = base64.encodebytes(der).decode("ascii").replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    text = "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines)
    return (text + "\n-----END CERTIFICATE-----\n").encode("ascii")


def _make(
    names: tuple[str, ...], issuer: tuple[bytes, bytes] | None, ca: bool
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    # An EC key from certificate(), either way.
    signer: Any = key
    issuer_name = subject
    if issuer is not None:
        issuer_name = x509.load_pem_x509_certificate(issuer[0]).subject
        signer = serialization.load_pem_private_key(issuer[1], None)
    now = datetime.datetime.now(datetime.timezone.utc)
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alternatives), False)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
