"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}``, the MAC is
HMAC-SHA256, and ``webhook-signature`` lists one ``v1,<base64>`` entry per
secret, separated by spaces, so a receiver can rotate keys.

Secrets: a string written ``whsec_<base64>`` (the Standard Webhooks
convention) is base64-decoded and the decoded bytes are the key; any other
string is used as its UTF-8 bytes.  A receiver using the ``standardwebhooks``
library passes ``whsec_...`` secrets as the same string, and other secrets as
bytes (``Webhook(secret.encode())``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable

SECRET_PREFIX = "whsec_"
VERSION = "v1"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a configured secret.

    Args:
        secret: ``whsec_<base64>`` or any other string.

    Returns:
        The base64-decoded bytes for ``whsec_`` secrets (padding optional),
        else the UTF-8 bytes of ``secret``.

    Raises:
        ValueError: For a ``whsec_`` secret that is not valid base64, or an
            empty key.
    """
    if secret.startswith(SECRET_PREFIX):
        encoded = secret[len(SECRET_PREFIX) :]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError("a whsec_ secret must be base64") from e
    else:
        key = secret.encode("utf-8")
    if not key:
        raise ValueError("a signing secret may not be empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One signature entry, ``v1,<base64 HMAC-SHA256>``.

    Args:
        secret: The configured secret (see :func:`secret_key`).
        msg_id: The ``webhook-id`` header value.
        timestamp: The ``webhook-timestamp`` header value, Unix seconds.
        body: The exact request body bytes.

    Returns:
        The entry for the ``webhook-signature`` header.
    """
    signed = b"%s.%d." % (msg_id.encode("utf-8"), timestamp) + body
    mac = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return f"{VERSION},{base64.b64encode(mac).decode('ascii')}"


def signature_header(secrets: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: one entry per secret, space-separated.

    Args:
        secrets: The route's secrets, in configuration order.
        msg_id: The ``webhook-id`` header value.
        timestamp: The ``webhook-timestamp`` header value, Unix seconds.
        body: The exact request body bytes.

    Returns:
        For example ``v1,K5oZ... v1,x8Qm...``; ``""`` when there is no secret.
    """
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets)
