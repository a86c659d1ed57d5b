"""TLS for the SMTP listener: the server's certificate, and what a session learnt.

:func:`load_server_tls` reads a PEM certificate (the server's, then any
intermediates: a ``fullchain.pem``) and its private key (in the same file or
another) into the options :meth:`ITLSTransport.startTLS` takes.  TLS 1.2 is
the oldest version offered; the ciphers are Twisted's defaults (forward
secrecy, no RC4 or 3DES).  Every problem is a :class:`TLSFilesError` with a
sentence saying what is wrong with which file, for ``gomail validate`` and the
start-up error.

The files are read whole on the calling thread, a few kilobytes each: at
start-up before the reactor runs, and at SIGHUP in a thread (with the
configuration, ``gomail.tap.read_for_reload``).
"""

from __future__ import annotations

from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.ssl import CertificateOptions, TLSVersion

_MAX_PEM_FILE = 1 << 20


class TLSFilesError(ValueError):
    """The certificate or key cannot be used; the message says why."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_PEM_FILE + 1)
    except OSError as e:
        raise TLSFilesError(f"cannot read the {what} {path!r}: {e.strerror or e}") from e
    if len(data) > _MAX_PEM_FILE:
        raise TLSFilesError(f"the {what} {path!r} is over 1 MiB: not a PEM file")
    return data


def load_server_tls(certificate: str, private_key: str | None = None) -> CertificateOptions:
    """The TLS options for a server with this certificate chain and key.

    Args:
        certificate: A PEM file: the server's certificate first, then its
            intermediates.  It may hold the private key too.
        private_key: A PEM file with the private key (default: ``certificate``).

    Raises:
        TLSFilesError: A file cannot be read, holds no certificate or key,
            or the key does not belong to the certificate.
    """
    cert_pem = _read(certificate, "TLS certificate")
    key_pem = cert_pem if private_key is None or private_key == certificate else _read(private_key, "TLS private key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)  # every certificate of the file, in order
    except ValueError as e:
        raise TLSFilesError(f"the TLS certificate {certificate!r} holds no PEM certificate that can be read: {e}") from e
    where = private_key or certificate
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)  # finds the key block among others
    except TypeError as e:  # it is encrypted
        raise TLSFilesError(f"the TLS private key {where!r} is encrypted: decrypt it first ({e})") from e
    except ValueError as e:
        raise TLSFilesError(f"the TLS private key {where!r} holds no PEM private key gomail can use: {e}") from e
    # pyOpenSSL takes cryptography's objects (and deprecates its own X509
    # and PKey there); Twisted's annotations still name the old types.
    options = CertificateOptions(
        privateKey=cast(Any, key),
        certificate=cast(Any, chain[0]),
        extraCertChain=cast(Any, chain[1:]),
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    try:
        options.getContext()  # checks that the key belongs to the certificate
    except SSL.Error as e:
        raise TLSFilesError(f"the TLS private key does not match the certificate {certificate!r}: {_reason(e)}") from e
    return options


def _reason(error: Exception) -> str:
    """OpenSSL's reasons, without its nested tuples."""
    reasons = [str(part[2]) for part in (error.args[0] if error.args and isinstance(error.args[0], list) else []) if len(part) >= 3]
    return "; ".join(r for r in reasons if r) or str(error) or type(error).__name__


def describe_session(transport: Any) -> str | None:
    """``TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)``, or None if unknown."""
    try:
        connection = transport.getHandle()
        version = connection.get_protocol_version_name()
        cipher = connection.get_cipher_name()
        bits = connection.get_cipher_bits()
    except Exception:  # noqa: BLE001 - a transport without OpenSSL underneath
        return None
    if not isinstance(version, str) or not isinstance(cipher, str):
        return None
    return f"{version} with cipher {cipher} ({bits}/{bits} bits)" if isinstance(bits, int) else f"{version} with cipher {cipher}"


__all__ = ["TLSFilesError", "describe_session", "load_server_tls"]
