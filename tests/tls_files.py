"""Self-signed certificates for the TLS tests (made with ``cryptography``)."""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _key(use_rsa: bool = False) -> Key:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048) if use_rsa else ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _certificate(subject: str, key: Key, issuer: str, issuer_key: Key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_certificate(folder: str, name: str = "mx.example.com", *, with_intermediate: bool = False, use_rsa: bool = False) -> tuple[str, str]:
    """Write ``cert.pem`` (the leaf, then an intermediate if asked) and
    ``key.pem`` (ECDSA P-256, or RSA 2048) into ``folder``; their paths."""
    os.makedirs(folder, exist_ok=True)
    key = _key(use_rsa)
    if with_intermediate:
        ca_key = _key()
        ca = _certificate("Test Intermediate", ca_key, "Test Intermediate", ca_key, True)
        leaf = _certificate(name, key, "Test Intermediate", ca_key, False)
        chain = [leaf, ca]
    else:
        chain = [_certificate(name, key, name, key, False)]
    cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    with open(key_path, "wb") as f:
        f.write(_pem_key(key))
    os.chmod(key_path, 0o600)
    return cert_path, key_path
