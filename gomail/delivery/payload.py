"""The body of a webhook call: JSON, or multipart with the raw message.

``docs/payload.md`` documents the format, with an example and a JSON Schema;
keep the two in step.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from gomail.delivery.settings import RouteSettings

PAYLOAD_TYPE = "message.received"
JSON_CONTENT_TYPE = "application/json"

MESSAGE_FIELDS: tuple[tuple[str, Any], ...] = (
    ("headers", list),
    ("subject", None),
    ("from", list),
    ("sender", list),
    ("to", list),
    ("cc", list),
    ("reply_to", list),
    ("date", None),
    ("message_id", None),
    ("in_reply_to", None),
    ("references", list),
    ("text", None),
    ("html", None),
    ("charsets", lambda: {"text": None, "html": None}),
    ("attachments", list),
    ("defects", list),
)
"""Fields of ``payload["message"]`` taken from the parsed message, with the
factory of their default when the parser left one out."""

ATTACHMENT_FIELDS: tuple[str, ...] = ("filename", "content_type", "size", "sha256", "content_id", "disposition")


def _dumps(document: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; falls back to ``\\u`` escapes for lone surrogates."""
    try:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(document, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _attachment_bytes_from_raw(raw: bytes) -> dict[str, bytes]:
    """Decoded leaf MIME parts of ``raw`` by their SHA-256 hex digest."""
    found: dict[str, bytes] = {}
    try:
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
        for part in parsed.walk():
            if part.is_multipart():
                continue
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                found.setdefault(hashlib.sha256(data).hexdigest(), data)
    except Exception:  # noqa: BLE001 - malformed MIME must not stop delivery
        return found
    return found


def _content_bytes(value: Any) -> bytes | None:
    """Attachment content as stored by the parser: bytes, or base64 text."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


def _attachments(parsed: list[dict[str, Any]], raw: bytes, inline_max: int) -> list[dict[str, Any]]:
    """Attachment metadata, with base64 ``content`` up to ``inline_max`` bytes."""
    result = []
    from_raw: dict[str, bytes] | None = None
    for attachment in parsed:
        item: dict[str, Any] = {name: attachment.get(name) for name in ATTACHMENT_FIELDS}
        content = None
        size = attachment.get("size")
        if inline_max > 0 and isinstance(size, int) and size <= inline_max:
            data = _content_bytes(attachment.get("content"))
            if data is None and attachment.get("sha256"):
                if from_raw is None:
                    from_raw = _attachment_bytes_from_raw(raw)
                data = from_raw.get(str(attachment["sha256"]))
            if data is not None and len(data) <= inline_max:
                content = base64.b64encode(data).decode("ascii")
        item["content"] = content
        result.append(item)
    return result


def payload_document(
    record: dict[str, Any],
    raw: bytes,
    route: RouteSettings,
    recipients: Sequence[str],
    job_id: str,
) -> dict[str, Any]:
    """The payload as a JSON-ready dict (see ``docs/payload.md``).

    Args:
        record: The stored message record (owned by the spool).
        raw: The raw MIME bytes of the message.
        route: The route the payload is for.
        recipients: The envelope recipients this delivery is for.
        job_id: The job id (the ``webhook-id``).

    Returns:
        The document; ``raw`` is filled in for ``base64`` and described (not
        included) for ``multipart``.
    """
    envelope = record.get("envelope") or {}
    connection = record.get("connection") or {}
    client = envelope.get("client") or {}
    parsed = record.get("message") or {}

    message: dict[str, Any] = {}
    for name, default in MESSAGE_FIELDS:
        value = parsed.get(name)
        message[name] = default() if value is None and default is not None else value
    message["attachments"] = _attachments(list(message["attachments"]), raw, route.inline_attachments_max)

    raw_part: dict[str, Any] | None = None
    if route.raw != "never":
        raw_part = {
            "encoding": "base64" if route.raw == "base64" else "binary",
            "size": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
        }
        if route.raw == "base64":
            raw_part["content"] = base64.b64encode(raw).decode("ascii")
        else:
            raw_part["part"] = "raw"

    return {
        "type": PAYLOAD_TYPE,
        "id": record.get("id"),
        "webhook_id": job_id,
        "route": route.name,
        "received_at": record.get("received_at"),
        "size": record.get("size", len(raw)),
        "envelope": {
            "mail_from": envelope.get("mail_from", record.get("sender", "")),
            "rcpt_to": list(recipients),
            "helo": envelope.get("helo", connection.get("client_helo")),
            "client": {
                "address": client.get("address", connection.get("client_address")),
                "port": client.get("port", connection.get("client_port")),
                "hostname": client.get("hostname", connection.get("client_hostname")),
            },
            "transport": envelope.get("transport", record.get("transport")),
            "tls": bool(envelope.get("tls", False)),
        },
        "message": message,
        "authentication": record.get("authentication") or {},
        "raw": raw_part,
    }


def _boundary(parts: Sequence[bytes]) -> bytes:
    """A multipart boundary found in none of ``parts`` (stable for equal input)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    counter = 0
    while True:
        boundary = b"gomail-" + hashlib.sha256(digest.digest() + b"%d" % counter).hexdigest()[:40].encode("ascii")
        if not any(b"--" + boundary in part for part in parts):
            return boundary
        counter += 1  # pragma: no cover - a 160-bit hash inside the message


def build_payload(
    record: dict[str, Any],
    raw: bytes,
    route: RouteSettings,
    recipients: Sequence[str],
    job_id: str,
) -> tuple[bytes, str]:
    """The request body and its ``Content-Type``.

    With ``route.raw`` ``never`` or ``base64`` the body is the JSON document.
    With ``multipart`` it is ``multipart/form-data`` with a ``payload`` part
    (the JSON) and a ``raw`` part (``message/rfc822``, the exact bytes).  The
    body depends only on its inputs, so every attempt sends the same bytes.

    Args:
        record: The stored message record.
        raw: The raw MIME bytes.
        route: The route.
        recipients: The envelope recipients this delivery is for.
        job_id: The job id.

    Returns:
        ``(body, content_type)``.
    """
    document = _dumps(payload_document(record, raw, route, recipients, job_id))
    if route.raw != "multipart":
        return document, JSON_CONTENT_TYPE
    boundary = _boundary((document, raw))
    filename = f"{record.get('id') or 'message'}.eml".encode("ascii", "replace")
    body = b"".join(
        [
            b"--" + boundary + b"\r\n",
            b'Content-Disposition: form-data; name="payload"\r\n',
            b"Content-Type: application/json\r\n\r\n",
            document,
            b"\r\n--" + boundary + b"\r\n",
            b'Content-Disposition: form-data; name="raw"; filename="' + filename + b'"\r\n',
            b"Content-Type: message/rfc822\r\n\r\n",
            raw,
            b"\r\n--" + boundary + b"--\r\n",
        ]
    )
    return body, "multipart/form-data; boundary=" + boundary.decode("ascii")
