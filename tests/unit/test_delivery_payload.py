"""Tests for gomail.delivery.payload: the JSON document, raw modes, attachments."""

from __future__ import annotations

import base64
import hashlib
import json
from email import message_from_bytes
from email.policy import HTTP

from twisted.trial.unittest import SynchronousTestCase

from gomail.delivery.payload import build_payload, payload_document
from gomail.delivery.settings import RouteSettings
from gomail.delivery.testing import sample_record
from gomail.parser import parse_message

RAW = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: app@example.com\r\n"
    b"Subject: Report\r\n"
    b"Message-ID: <r1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"See attached.\r\n"
    b"--b1\r\n"
    b'Content-Type: text/csv; name="small.csv"\r\n'
    b'Content-Disposition: attachment; filename="small.csv"\r\n'
    b"\r\n"
    b"a,b\r\n1,2\r\n"
    b"--b1\r\n"
    b'Content-Type: application/octet-stream; name="big.bin"\r\n'
    b'Content-Disposition: attachment; filename="big.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n" + base64.encodebytes(bytes(range(256)) * 8).replace(b"\n", b"\r\n") + b"--b1--\r\n"
)
JOB = "01JDTESTMESSAGE0000000000A-0123456789abcdef"


def route(**kwargs: object) -> RouteSettings:
    return RouteSettings(name="app", match=("*@example.com",), url="http://h.example/", **kwargs)  # type: ignore[arg-type]


def record() -> dict[str, object]:
    rec = sample_record(rcpt_to=("app@example.com", "other@example.com"), size=len(RAW))
    rec["message"] = parse_message(RAW)
    return json.loads(json.dumps(rec))


class PayloadTests(SynchronousTestCase):
    """The webhook body."""

    def test_shape(self) -> None:
        """The document has the documented top-level keys, envelope and message."""
        body, content_type = build_payload(record(), RAW, route(), ["app@example.com"], JOB)
        self.assertEqual(content_type, "application/json")
        doc = json.loads(body)
        self.assertEqual(
            list(doc),
            ["type", "id", "webhook_id", "route", "received_at", "size", "envelope", "message", "authentication", "raw"],
        )
        self.assertEqual(
            (doc["type"], doc["id"], doc["webhook_id"], doc["route"], doc["received_at"], doc["size"]),
            ("message.received", "01JDTESTMESSAGE0000000000A", JOB, "app", "2026-11-25T19:30:00.123Z", len(RAW)),
        )
        self.assertEqual(
            doc["envelope"],
            {
                "mail_from": "alice@example.org",
                "rcpt_to": ["app@example.com"],
                "helo": "mail.example.org",
                "client": {"address": "203.0.113.5", "port": 40000, "hostname": "mail.example.org"},
                "transport": "smtp",
                "tls": True,
            },
        )
        self.assertEqual(
            list(doc["message"]),
            [
                "headers",
                "subject",
                "from",
                "sender",
                "to",
                "cc",
                "reply_to",
                "date",
                "message_id",
                "in_reply_to",
                "references",
                "text",
                "html",
                "charsets",
                "attachments",
                "defects",
            ],
        )
        self.assertEqual(doc["message"]["subject"], "Report")
        self.assertEqual(doc["message"]["from"], [{"address": "alice@example.org", "name": "Alice"}])
        self.assertEqual(doc["authentication"], {"spf": "pass"})
        self.assertIsNone(doc["raw"])

    def test_attachments_metadata_only_by_default(self) -> None:
        """With inline_attachments_max 0 attachments carry metadata and null content."""
        doc = payload_document(record(), RAW, route(), ["app@example.com"], JOB)
        small, big = doc["message"]["attachments"]
        self.assertEqual(
            small,
            {
                "filename": "small.csv",
                "content_type": "text/csv",
                "size": 8,
                "sha256": hashlib.sha256(b"a,b\r\n1,2").hexdigest(),
                "content_id": None,
                "disposition": "attachment",
                "content": None,
            },
        )
        self.assertEqual((big["filename"], big["size"], big["content"]), ("big.bin", 2048, None))

    def test_attachments_inline_up_to_limit(self) -> None:
        """Attachments up to inline_attachments_max carry base64 content (taken from the raw message)."""
        doc = payload_document(record(), RAW, route(inline_attachments_max=100), ["app@example.com"], JOB)
        small, big = doc["message"]["attachments"]
        self.assertEqual(base64.b64decode(small["content"]), b"a,b\r\n1,2")
        self.assertIsNone(big["content"])
        doc = payload_document(record(), RAW, route(inline_attachments_max=4096), ["app@example.com"], JOB)
        self.assertEqual(base64.b64decode(doc["message"]["attachments"][1]["content"]), bytes(range(256)) * 8)

    def test_parser_content_is_reused(self) -> None:
        """Content the parser already inlined is used as is."""
        rec = record()
        rec["message"] = parse_message(RAW, inline_attachment_limit=100)  # type: ignore[index]
        doc = payload_document(rec, b"", route(inline_attachments_max=100), ["app@example.com"], JOB)
        self.assertEqual(base64.b64decode(doc["message"]["attachments"][0]["content"]), b"a,b\r\n1,2")

    def test_raw_base64(self) -> None:
        """raw: base64 puts the exact message in the JSON with its size and digest."""
        body, content_type = build_payload(record(), RAW, route(raw="base64"), ["app@example.com"], JOB)
        raw = json.loads(body)["raw"]
        self.assertEqual(content_type, "application/json")
        self.assertEqual(
            raw,
            {"encoding": "base64", "size": len(RAW), "sha256": hashlib.sha256(RAW).hexdigest(), "content": base64.b64encode(RAW).decode()},
        )

    def test_raw_multipart(self) -> None:
        """raw: multipart sends multipart/form-data with the JSON and the exact raw bytes."""
        body, content_type = build_payload(record(), RAW, route(raw="multipart"), ["app@example.com"], JOB)
        self.assertTrue(content_type.startswith("multipart/form-data; boundary=gomail-"))
        parsed = message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body, policy=HTTP)
        payload_part, raw_part = parsed.iter_parts()
        self.assertEqual(payload_part.get_param("name", header="content-disposition"), "payload")
        self.assertEqual(payload_part.get_content_type(), "application/json")
        doc = json.loads(payload_part.get_payload(decode=True))
        self.assertEqual(doc["raw"], {"encoding": "binary", "size": len(RAW), "sha256": hashlib.sha256(RAW).hexdigest(), "part": "raw"})
        self.assertEqual(raw_part.get_param("name", header="content-disposition"), "raw")
        self.assertEqual(raw_part.get_filename(), "01JDTESTMESSAGE0000000000A.eml")
        self.assertIn(b"\r\n\r\n" + RAW + b"\r\n--", body)

    def test_same_body_every_time(self) -> None:
        """The body depends only on its inputs (every attempt sends the same bytes)."""
        for mode in ("never", "base64", "multipart"):
            first = build_payload(record(), RAW, route(raw=mode), ["app@example.com"], JOB)
            self.assertEqual(build_payload(record(), RAW, route(raw=mode), ["app@example.com"], JOB), first)

    def test_unparsed_record(self) -> None:
        """A record without a parsed message still gives every key, with empty defaults."""
        rec = sample_record()
        rec["message"] = None
        doc = payload_document(rec, b"", route(), ["app@example.com"], JOB)
        self.assertEqual(doc["message"]["headers"], [])
        self.assertEqual(doc["message"]["charsets"], {"text": None, "html": None})
        self.assertIsNone(doc["message"]["subject"])

    def test_utf8_body(self) -> None:
        """Non-ASCII text is sent as UTF-8, not escaped."""
        rec = sample_record()
        rec["message"]["subject"] = "Grüße ✓"
        body, _ = build_payload(rec, b"", route(), ["app@example.com"], JOB)
        self.assertIn("Grüße ✓".encode(), body)
