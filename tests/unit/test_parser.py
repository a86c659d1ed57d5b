"""Tests for gomail.parser: MIME parsing into the webhook dict, and its bounds."""

from __future__ import annotations

import base64
import hashlib
import json
import quopri
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from gomail.parser import (
    _POLICY,
    _date,
    _Defects,
    _parse_address_full,
    header_addresses,
    parse_header_summary,
    parse_message,
    simple_mailbox,
)

RESULT_KEYS = {
    "headers",
    "subject",
    "from",
    "to",
    "cc",
    "bcc",
    "reply_to",
    "sender",
    "date",
    "message_id",
    "in_reply_to",
    "references",
    "text",
    "html",
    "charsets",
    "attachments",
    "defects",
}
SUMMARY_KEYS = {"subject", "message_id", "from", "to", "cc"}
ATTACHMENT_KEYS = {"filename", "content_type", "size", "sha256", "content_id", "disposition", "content"}
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def crlf(text: str) -> bytes:
    """Encode a test message written with ``\\n`` line ends as wire bytes."""
    return text.replace("\n", "\r\n").encode("utf-8")


def assert_json_ready(result: dict[str, Any]) -> None:
    """Fail unless ``result`` serialises to strict UTF-8 JSON."""
    json.dumps(result, ensure_ascii=False, allow_nan=False).encode("utf-8")


def assert_shape(result: dict[str, Any]) -> None:
    """Fail unless ``result`` has the documented keys and value types."""
    assert set(result) == RESULT_KEYS
    assert isinstance(result["headers"], list)
    for header in result["headers"]:
        assert set(header) == {"name", "value"}
        assert isinstance(header["name"], str) and isinstance(header["value"], str)
    for key in ("from", "to", "cc", "bcc", "reply_to", "sender"):
        for address in result[key]:
            assert set(address) == {"address", "name"}
            assert isinstance(address["address"], str) and "@" in address["address"]
            assert address["name"] is None or isinstance(address["name"], str)
    for key in ("subject", "date", "message_id", "in_reply_to", "text", "html"):
        assert result[key] is None or isinstance(result[key], str)
    assert all(isinstance(ref, str) for ref in result["references"])
    assert set(result["charsets"]) == {"text", "html"}
    for attachment in result["attachments"]:
        assert set(attachment) == ATTACHMENT_KEYS
        assert isinstance(attachment["size"], int) and len(attachment["sha256"]) == 64
    assert all(isinstance(defect, str) for defect in result["defects"])
    assert_json_ready(result)


def nested_multipart(depth: int, leaf: str = "Content-Type: text/plain\n\ndeep") -> bytes:
    """Build ``depth`` multiparts, each inside the last, around one leaf."""
    body = leaf
    for level in reversed(range(depth)):
        body = f"Content-Type: multipart/mixed; boundary=b{level}\n\n--b{level}\n{body}\n--b{level}--\n"
    return crlf(body)


SIMPLE = crlf(
    "From: Alice Example <alice@example.org>\n"
    "To: bob@example.com\n"
    "Subject: Lunch\n"
    "Date: Wed, 25 Nov 2026 14:30:00 -0500\n"
    "Message-ID: <m1@example.org>\n"
    "\n"
    "See you at noon.\n"
)


class PlainMessageTests(SynchronousTestCase):
    """A simple single-part message."""

    def test_plain_text(self) -> None:
        """A one-part text/plain message gives its headers, addresses and body."""
        result = parse_message(SIMPLE)
        self.assertEqual(
            result["headers"],
            [
                {"name": "From", "value": "Alice Example <alice@example.org>"},
                {"name": "To", "value": "bob@example.com"},
                {"name": "Subject", "value": "Lunch"},
                {"name": "Date", "value": "Wed, 25 Nov 2026 14:30:00 -0500"},
                {"name": "Message-ID", "value": "<m1@example.org>"},
            ],
        )
        self.assertEqual(result["subject"], "Lunch")
        self.assertEqual(result["from"], [{"address": "alice@example.org", "name": "Alice Example"}])
        self.assertEqual(result["to"], [{"address": "bob@example.com", "name": None}])
        self.assertEqual((result["cc"], result["bcc"], result["reply_to"], result["sender"]), ([], [], [], []))
        self.assertEqual(result["date"], "2026-11-25T19:30:00Z")
        self.assertEqual(result["message_id"], "<m1@example.org>")
        self.assertEqual((result["in_reply_to"], result["references"]), (None, []))
        self.assertEqual(result["text"], "See you at noon.\r\n")
        self.assertIsNone(result["html"])
        self.assertEqual(result["charsets"], {"text": None, "html": None})
        self.assertEqual(result["attachments"], [])
        self.assertEqual(result["defects"], [])
        assert_shape(result)

    def test_folded_header_unfolded(self) -> None:
        """A folded header value comes back on one line, folding whitespace kept."""
        result = parse_message(crlf("Subject: part one\n\tpart two\n  part three\n\nx"))
        self.assertEqual(result["subject"], "part one\tpart two  part three")
        self.assertEqual(result["headers"], [{"name": "Subject", "value": "part one\tpart two  part three"}])

    def test_max_headers(self) -> None:
        """Only max_headers headers are listed, and the cut is recorded."""
        raw = b"".join(b"X-N: %d\r\n" % n for n in range(10)) + b"\r\nbody"
        result = parse_message(raw, max_headers=3)
        self.assertEqual(result["headers"], [{"name": "X-N", "value": str(n)} for n in range(3)])
        self.assertIn("max_headers exceeded", result["defects"])

    def test_empty_bytes(self) -> None:
        """Empty input gives the empty result with one defect."""
        result = parse_message(b"")
        expected: dict[str, Any] = {
            key: [] for key in ("headers", "from", "to", "cc", "bcc", "reply_to", "sender", "references", "attachments")
        }
        expected.update(dict.fromkeys(("subject", "date", "message_id", "in_reply_to", "text", "html")))
        expected["charsets"] = {"text": None, "html": None}
        expected["defects"] = ["empty message"]
        self.assertEqual(result, expected)

    def test_not_a_message(self) -> None:
        """Bytes that are not a message become a headerless text body, with a defect."""
        result = parse_message(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
        self.assertEqual(result["headers"], [])
        self.assertEqual(result["subject"], None)
        self.assertEqual(result["text"], "\ufffdPNG\r\n\x1a\n\x00\x00\x00\rIHDR")
        self.assertEqual(result["defects"], ["MissingHeaderBodySeparatorDefect"])
        assert_shape(result)

    def test_not_bytes(self) -> None:
        """A str instead of bytes is reported, not raised."""
        result = parse_message("Subject: hi\r\n\r\nbody")  # type: ignore[arg-type]
        self.assertEqual(result["defects"], ["parse error: TypeError"])
        self.assertEqual(result["text"], None)


class BodyTests(SynchronousTestCase):
    """Text and HTML bodies: structure, transfer encodings and charsets."""

    def test_multipart_alternative(self) -> None:
        """multipart/alternative yields both the text and the HTML body with their charsets."""
        raw = crlf(
            "Subject: alt\n"
            'Content-Type: multipart/alternative; boundary="==alt=="\n'
            "\n"
            "preamble\n"
            "--==alt==\n"
            "Content-Type: text/plain; charset=utf-8\n"
            "\n"
            "Hello \u00e9\n"
            "--==alt==\n"
            'Content-Type: text/html; charset="UTF-8"\n'
            "\n"
            "<p>Hello &eacute;</p>\n"
            "--==alt==--\n"
        )
        result = parse_message(raw)
        self.assertEqual(result["text"], "Hello \u00e9")
        self.assertEqual(result["html"], "<p>Hello &eacute;</p>")
        self.assertEqual(result["charsets"], {"text": "utf-8", "html": "utf-8"})
        self.assertEqual(result["attachments"], [])
        self.assertEqual(result["defects"], [])

    def test_inline_text_parts_concatenated(self) -> None:
        """Several inline text/plain parts are joined with a newline; later HTML parts are attachments."""
        raw = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n"
            "--b\nContent-Type: text/plain\n\none\n"
            "--b\nContent-Type: text/html\n\n<b>first</b>\n"
            "--b\nContent-Type: text/plain\nContent-Disposition: inline\n\ntwo\n"
            "--b\nContent-Type: text/html\n\n<b>second</b>\n"
            "--b--\n"
        )
        result = parse_message(raw)
        self.assertEqual(result["text"], "one\ntwo")
        self.assertEqual(result["html"], "<b>first</b>")
        self.assertEqual([a["content_type"] for a in result["attachments"]], ["text/html"])
        self.assertEqual(result["attachments"][0]["size"], len(b"<b>second</b>"))

    def test_latin1_body(self) -> None:
        """An ISO-8859-1 body is decoded to Unicode and its charset noted."""
        raw = b"Content-Type: text/plain; charset=ISO-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9 cr\xe8me"
        result = parse_message(raw)
        self.assertEqual(result["text"], "caf\u00e9 cr\u00e8me")
        self.assertEqual(result["charsets"], {"text": "iso-8859-1", "html": None})
        self.assertEqual(result["defects"], [])

    def test_windows1252_body(self) -> None:
        """A Windows-1252 body's curly quotes and euro sign are decoded."""
        raw = b"Content-Type: text/html; charset=windows-1252\r\n\r\n\x93quoted\x94 \x805"
        result = parse_message(raw)
        self.assertEqual(result["html"], "\u201cquoted\u201d \u20ac5")
        self.assertEqual(result["charsets"], {"text": None, "html": "windows-1252"})

    def test_base64_body(self) -> None:
        """A base64 body is decoded, then its charset applied."""
        encoded = base64.encodebytes("Gr\u00fc\u00dfe aus K\u00f6ln\n".encode()).decode("ascii")
        raw = crlf(f"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n\n{encoded}")
        result = parse_message(raw)
        self.assertEqual(result["text"], "Gr\u00fc\u00dfe aus K\u00f6ln\n")
        self.assertEqual(result["defects"], [])

    def test_bad_base64_body(self) -> None:
        """Broken base64 is decoded as far as possible and recorded."""
        raw = crlf("Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\naGVsbG8*gd29ybGQ\n")
        result = parse_message(raw)
        self.assertEqual(result["text"], "hello world")
        self.assertEqual(result["defects"], ["InvalidBase64CharactersDefect", "InvalidBase64PaddingDefect"])

    def test_quoted_printable(self) -> None:
        """Quoted-printable soft breaks are joined and =XX escapes decoded."""
        raw = crlf(
            "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\ncaf=C3=A9 =\nsoft break =3D ok\n"
        )
        result = parse_message(raw)
        self.assertEqual(result["text"], "caf\u00e9 soft break = ok\r\n")

    def test_unknown_charset(self) -> None:
        """An unknown charset is recorded and the body read as UTF-8 with replacements."""
        raw = b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nok \xc3\xa9 \xff"
        result = parse_message(raw)
        self.assertEqual(result["text"], "ok \u00e9 \ufffd")
        self.assertEqual(result["charsets"], {"text": "x-no-such-charset", "html": None})
        self.assertEqual(result["defects"], ["undecodable charset: x-no-such-charset"])

    def test_non_text_codec_charset(self) -> None:
        """A charset naming a non-text codec (base64, idna) is treated as unknown."""
        for charset in ("base64", "idna"):
            raw = b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n\r\nabc \xe9"
            result = parse_message(raw)
            self.assertEqual(result["text"], "abc \ufffd")
            self.assertEqual(result["defects"], [f"undecodable charset: {charset}"])

    def test_codec_producing_surrogates(self) -> None:
        """A codec that decodes to lone surrogates (UTF-7) still gives UTF-8-safe text."""
        result = parse_message(b"Content-Type: text/plain; charset=utf-7\r\n\r\n+2AA- ok")
        self.assertEqual(result["text"], "\ufffd ok")
        assert_shape(result)

    def test_undeclared_8bit_body(self) -> None:
        """A body without a charset is read as UTF-8; invalid bytes become U+FFFD."""
        result = parse_message(b"Subject: x\r\n\r\n\xe2\x82\xac \xe9")
        self.assertEqual(result["text"], "\u20ac \ufffd")
        self.assertEqual(result["charsets"], {"text": None, "html": None})


class HeaderDecodingTests(SynchronousTestCase):
    """RFC 2047 encoded words, raw 8-bit headers, dates and ids."""

    def test_encoded_subject_and_names(self) -> None:
        """Encoded words in Subject and in display names are decoded."""
        raw = crlf(
            "From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <jorg@example.de>\n"
            'To: =?ISO-8859-1?B?Suly9G1l?= <jerome@example.fr>, "Plain, Name" <p@example.com>\n'
            "Subject: =?utf-8?b?w4dhIHZh?= =?utf-8?q?_bien?= !\n"
            "\n"
            "x"
        )
        result = parse_message(raw)
        self.assertEqual(result["subject"], "\u00c7a va bien !")
        self.assertEqual(result["from"], [{"address": "jorg@example.de", "name": "J\u00f6rg M\u00fcller"}])
        self.assertEqual(
            result["to"],
            [{"address": "jerome@example.fr", "name": "J\u00e9r\u00f4me"}, {"address": "p@example.com", "name": "Plain, Name"}],
        )
        self.assertEqual(result["headers"][2], {"name": "Subject", "value": "\u00c7a va bien !"})
        self.assertEqual(result["defects"], [])

    def test_broken_encoded_words(self) -> None:
        """Broken encoded words never raise: unterminated ones stay literal, bad ones are recorded."""
        raw = crlf(
            "Subject: =?utf-8?q?unterminated and =?utf-8?b?###?= then =?x-nowhere?q?abc?=\nFrom: =?utf-8?q?Half <half@example.com>\n\nx"
        )
        result = parse_message(raw)
        self.assertEqual(result["subject"], "=?utf-8?q?unterminated and  then abc")
        self.assertEqual(result["from"], [{"address": "half@example.com", "name": "=?utf-8?q?Half"}])
        self.assertEqual(result["defects"], ["InvalidBase64CharactersDefect", "CharsetError"])

    def test_raw_8bit_headers(self) -> None:
        """Raw UTF-8 header bytes are read as UTF-8, other 8-bit bytes as Windows-1252."""
        raw = b"Subject: \xc3\xa9t\xc3\xa9 \x80\r\nFrom: \xe9t\xe9 <ete@example.fr>\r\n\r\nx"
        result = parse_message(raw)
        self.assertEqual(result["subject"], "\u00e9t\u00e9 \u20ac")
        self.assertEqual(result["from"], [{"address": "ete@example.fr", "name": "\u00e9t\u00e9"}])
        self.assertEqual(result["headers"][1], {"name": "From", "value": "\u00e9t\u00e9 <ete@example.fr>"})

    def test_nul_and_control_bytes_in_headers(self) -> None:
        """NUL and control bytes in headers survive and serialise."""
        result = parse_message(b"Subject: a\x00b\x7f\x1b\r\nTo: a\x00@example.com\r\n\r\nx")
        self.assertEqual(result["subject"], "a\x00b\x7f\x1b")
        assert_shape(result)

    def test_date_converted_to_utc(self) -> None:
        """Dates are converted to UTC; -0000 is taken as UTC; bad dates are null with a defect."""
        cases = {
            "Wed, 25 Nov 2026 14:30:00 -0500": "2026-11-25T19:30:00Z",
            "Thu, 26 Nov 2026 01:15:09 +0530": "2026-11-25T19:45:09Z",
            "25 Nov 2026 19:30 -0000": "2026-11-25T19:30:00Z",
            "Wed, 25 Nov 26 19:30:00 GMT": "2026-11-25T19:30:00Z",
        }
        for value, expected in cases.items():
            result = parse_message(crlf(f"Date: {value}\n\nx"))
            self.assertEqual(result["date"], expected, value)
            self.assertEqual(result["defects"], [])
        result = parse_message(crlf("Date: last Tuesday\n\nx"))
        self.assertIsNone(result["date"])
        self.assertEqual(result["defects"], ["InvalidDateDefect", "unparseable date"])

    def test_overlong_date(self) -> None:
        """A Date value too long to be a date is not parsed."""
        result = parse_message(b"Date: " + b"Wed, 25 Nov 2026 14:30:00 -0500 " * 10 + b"\r\n\r\nx")
        self.assertIsNone(result["date"])
        self.assertEqual(result["defects"], ["unparseable date"])

    def test_decode_budget(self) -> None:
        """Encoded words are decoded up to a total budget; later headers keep their raw text."""
        raw = b"".join(b"X-%d: =?utf-8?q?" % n + b"a" * 7000 + b"?=\r\n" for n in range(12)) + b"\r\nx"
        result = parse_message(raw)
        self.assertEqual(result["headers"][0]["value"], "a" * 7000)
        self.assertEqual(result["headers"][-1]["value"], "=?utf-8?q?" + "a" * 7000 + "?=")
        self.assertEqual(result["defects"], ["header decode budget exceeded"])

    def test_ids_and_references(self) -> None:
        """Message-ID and In-Reply-To are reduced to <...>; References becomes a list."""
        raw = crlf(
            "Message-ID:   <abc@example.org>  \n"
            "In-Reply-To: <prev@example.org> (message from Bob)\n"
            "References: <r1@example.org>\n"
            " <r2@example.org>\t<r3@example.org>\n"
            "\n"
            "x"
        )
        result = parse_message(raw)
        self.assertEqual(result["message_id"], "<abc@example.org>")
        self.assertEqual(result["in_reply_to"], "<prev@example.org>")
        self.assertEqual(result["references"], ["<r1@example.org>", "<r2@example.org>", "<r3@example.org>"])

    def test_id_without_brackets(self) -> None:
        """An id without angle brackets is kept as given, stripped."""
        result = parse_message(crlf("Message-ID:  bare-id@example.org \nReferences: a@x b@y\n\nx"))
        self.assertEqual(result["message_id"], "bare-id@example.org")
        self.assertEqual(result["references"], ["a@x", "b@y"])


class AddressTests(SynchronousTestCase):
    """Address lists: groups, broken entries and the parsing budget."""

    def test_groups_flattened(self) -> None:
        """Group members are listed as plain addresses; an empty group adds nothing."""
        raw = crlf(
            "To: Friends: a@example.com, Bob <b@example.com>;, c@example.com\n"
            "Cc: undisclosed-recipients:;\n"
            'Reply-To: "Support (EU)" <support@example.com>\n'
            "Sender: list-bounces@example.com\n"
            "\n"
            "x"
        )
        result = parse_message(raw)
        self.assertEqual(
            result["to"],
            [
                {"address": "a@example.com", "name": None},
                {"address": "b@example.com", "name": "Bob"},
                {"address": "c@example.com", "name": None},
            ],
        )
        self.assertEqual(result["cc"], [])
        self.assertEqual(result["reply_to"], [{"address": "support@example.com", "name": "Support (EU)"}])
        self.assertEqual(result["sender"], [{"address": "list-bounces@example.com", "name": None}])
        self.assertEqual(result["defects"], [])

    def test_unparseable_entries_recorded(self) -> None:
        """Entries without a domain or that break the parser are dropped and recorded; good ones stay."""
        raw = crlf("To: good@example.com, just words, a@b@c, <>, ok@example.org\nCc: x@y.z, @,\n\nx")
        result = parse_message(raw)
        self.assertEqual(result["to"], [{"address": "good@example.com", "name": None}, {"address": "ok@example.org", "name": None}])
        self.assertEqual(result["cc"], [{"address": "x@y.z", "name": None}])
        self.assertIn("unparseable address in to", result["defects"])
        self.assertIn("unparseable address in cc", result["defects"])
        assert_shape(result)

    def test_parser_crash_falls_back_to_legacy_parser(self) -> None:
        """An entry that crashes the modern address parser is retried with the legacy one."""
        result = parse_message(b"To: x@, good@example.com\r\n\r\n")
        self.assertEqual(result["to"], [{"address": "good@example.com", "name": None}])
        self.assertEqual(result["defects"], ["unparseable address in to"])

    def test_overlong_address_skipped(self) -> None:
        """One overlong entry is skipped and recorded; the others are kept."""
        result = parse_message(b'To: "' + b"x" * 2000 + b'" <a@example.com>, b@example.com\r\n\r\n')
        self.assertEqual(result["to"], [{"address": "b@example.com", "name": None}])
        self.assertEqual(result["defects"], ["address too long in to"])

    def test_repeated_address_headers_merged(self) -> None:
        """Every occurrence of an address header contributes its addresses."""
        result = parse_message(crlf("To: a@example.com\nTo: b@example.com\n\nx"))
        self.assertEqual(result["to"], [{"address": "a@example.com", "name": None}, {"address": "b@example.com", "name": None}])

    def test_address_budget(self) -> None:
        """A huge address list is parsed up to the budget, without cutting an address in half."""
        raw = b"To: " + b", ".join(b"User %d <user%d@example.com>" % (n, n) for n in range(5000)) + b"\r\n\r\nx"
        result = parse_message(raw)
        self.assertIn("address budget exceeded", result["defects"])
        count = len(result["to"])
        self.assertTrue(500 < count < 5000, count)
        self.assertEqual(result["to"][-1], {"address": f"user{count - 1}@example.com", "name": f"User {count - 1}"})

    def test_pathological_address_header_bounded(self) -> None:
        """Input that is quadratic for the stdlib header parser is cut off, not parsed for minutes."""
        raw = (
            b"To: "
            + b'"a' * 50000
            + b"@b\r\nCc: "
            + b"," * 100000
            + b"\r\nSubject: =?utf-8?q?a?="
            + b'"=?utf-8?q?a?="' * 5000
            + b"\r\n\r\nx"
        )
        result = parse_message(raw)
        self.assertEqual((result["to"], result["cc"]), ([], []))
        self.assertIn("address budget exceeded", result["defects"])
        self.assertIn("header too long to decode", result["defects"])


class AttachmentTests(SynchronousTestCase):
    """Attachments: names, sizes, hashes, content and nested messages."""

    def test_attachment_size_and_sha256(self) -> None:
        """An attachment reports its decoded size and SHA-256, and no content by default."""
        data = bytes(range(256)) * 4
        encoded = base64.encodebytes(data).decode("ascii")
        raw = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n"
            "--b\nContent-Type: text/plain\n\nsee attached\n"
            "--b\nContent-Type: application/octet-stream\n"
            'Content-Disposition: attachment; filename="blob.bin"\n'
            f"Content-Transfer-Encoding: base64\n\n{encoded}"
            "--b--\n"
        )
        result = parse_message(raw)
        self.assertEqual(result["text"], "see attached")
        self.assertEqual(
            result["attachments"],
            [
                {
                    "filename": "blob.bin",
                    "content_type": "application/octet-stream",
                    "size": 1024,
                    "sha256": "785b0751fc2c53dc14a4ce3d800e69ef9ce1009eb327ccf458afe09c242c26c9",
                    "content_id": None,
                    "disposition": "attachment",
                    "content": None,
                }
            ],
        )
        self.assertEqual(result["attachments"][0]["sha256"], hashlib.sha256(data).hexdigest())

    def test_inline_attachment_limit(self) -> None:
        """Content is included in base64 only up to inline_attachment_limit bytes."""
        raw = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n"
            "--b\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\naGVsbG8=\n"
            "--b\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\naGVsbG8gd29ybGQ=\n"
            "--b--\n"
        )
        result = parse_message(raw, inline_attachment_limit=5)
        self.assertEqual([a["content"] for a in result["attachments"]], ["aGVsbG8=", None])
        self.assertEqual([a["size"] for a in result["attachments"]], [5, 11])

    def test_rfc2231_filename(self) -> None:
        """RFC 2231 filenames (charset, percent-encoding, continuations) are decoded."""
        raw = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n"
            "--b\nContent-Type: application/pdf\n"
            "Content-Disposition: attachment; filename*=UTF-8''na%C3%AFve%20r%C3%A9sum%C3%A9.pdf\n\nx\n"
            "--b\nContent-Type: application/pdf\n"
            "Content-Disposition: attachment;\n filename*0*=iso-8859-1''caf%E9-;\n filename*1=\"menu.pdf\"\n\nx\n"
            '--b\nContent-Type: application/pdf; name="=?utf-8?b?w6l0w6kucGRm?="\n\nx\n'
            "--b--\n"
        )
        result = parse_message(raw)
        self.assertEqual(
            [a["filename"] for a in result["attachments"]], ["na\u00efve r\u00e9sum\u00e9.pdf", "caf\u00e9-menu.pdf", "\u00e9t\u00e9.pdf"]
        )
        self.assertEqual([a["disposition"] for a in result["attachments"]], ["attachment", "attachment", None])

    def test_inline_image_with_content_id(self) -> None:
        """An inline image in multipart/related is an attachment with its Content-ID."""
        raw = crlf(
            "Content-Type: multipart/related; boundary=r\n\n"
            '--r\nContent-Type: text/html\n\n<img src="cid:logo@x">\n'
            "--r\nContent-Type: image/png\nContent-Disposition: inline\nContent-ID:  <logo@x> \n"
            "Content-Transfer-Encoding: base64\n\niVBORw0KGgo=\n"
            "--r--\n"
        )
        result = parse_message(raw)
        self.assertEqual(result["html"], '<img src="cid:logo@x">')
        self.assertEqual(len(result["attachments"]), 1)
        image = result["attachments"][0]
        self.assertEqual(
            (image["content_type"], image["content_id"], image["disposition"], image["filename"]), ("image/png", "<logo@x>", "inline", None)
        )
        self.assertEqual(image["size"], 8)

    def test_text_part_with_filename_is_attachment(self) -> None:
        """A text/plain part with a filename is an attachment, not body text."""
        raw = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n"
            "--b\nContent-Type: text/plain\n\nbody\n"
            '--b\nContent-Type: text/plain; name="notes.txt"\n\nnotes\n'
            "--b\nContent-Type: text/calendar\n\nBEGIN:VCALENDAR\n"
            "--b--\n"
        )
        result = parse_message(raw)
        self.assertEqual(result["text"], "body")
        self.assertEqual(
            [(a["filename"], a["content_type"]) for a in result["attachments"]], [("notes.txt", "text/plain"), (None, "text/calendar")]
        )

    def test_message_rfc822_attachment(self) -> None:
        """A forwarded message is one message/rfc822 attachment with its original bytes; its parts stay inside."""
        inner = "From: carol@example.net\r\nSubject: inner\r\n\r\ninner body"
        raw = crlf(
            "Subject: outer\n"
            "Content-Type: multipart/mixed; boundary=b\n\n"
            "--b\nContent-Type: text/plain\n\nouter body\n"
            "--b\nContent-Type: message/rfc822\nContent-Disposition: attachment; filename=fwd.eml\n\n"
            "From: carol@example.net\nSubject: inner\n\ninner body\n"
            "--b--\n"
        )
        result = parse_message(raw)
        self.assertEqual(result["subject"], "outer")
        self.assertEqual(result["text"], "outer body")
        self.assertEqual(result["from"], [])
        self.assertEqual(
            result["attachments"],
            [
                {
                    "filename": "fwd.eml",
                    "content_type": "message/rfc822",
                    "size": len(inner),
                    "sha256": hashlib.sha256(inner.encode()).hexdigest(),
                    "content_id": None,
                    "disposition": "attachment",
                    "content": None,
                }
            ],
        )

    def test_delivery_status_attachment(self) -> None:
        """A message/delivery-status part is an attachment holding its header blocks."""
        raw = crlf(
            "Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
            "--b\nContent-Type: text/plain\n\nbounced\n"
            "--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.com\n\nAction: failed\nStatus: 5.1.1\n"
            "--b--\n"
        )
        result = parse_message(raw, inline_attachment_limit=1000)
        self.assertEqual(result["text"], "bounced")
        status = result["attachments"][0]
        self.assertEqual(status["content_type"], "message/delivery-status")
        self.assertEqual(
            base64.b64decode(status["content"]), b"Reporting-MTA: dns; mx.example.com\r\n\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        )


class BrokenStructureTests(SynchronousTestCase):
    """MIME headers that break the stdlib parsers."""

    def test_unparseable_content_type(self) -> None:
        """A Content-Type that crashes the header parser is read as text, not fatal."""
        result = parse_message(b"Subject: s\r\nContent-Type: multipart/mixed; boundar*\r\n\r\nhello")
        self.assertEqual(result["subject"], "s")
        self.assertIsNone(result["text"])
        self.assertEqual(
            result["defects"], ["NoBoundaryInMultipartDefect", "MultipartInvariantViolationDefect", "unparseable header: content-type"]
        )

    def test_unparseable_filename(self) -> None:
        """A filename that cannot be decoded is null; the attachment is still reported."""
        raw = b"Content-Type: text/plain\r\nContent-Disposition: attachment; filename*=\x00UTF-8''a%C3%AF.pdf\r\n\r\nhello"
        result = parse_message(raw)
        self.assertEqual([(a["filename"], a["disposition"], a["size"]) for a in result["attachments"]], [(None, "attachment", 5)])
        self.assertEqual(result["defects"], ["unparseable filename", "unparseable header: content-disposition"])

    def test_delivery_status_cut_by_max_parts(self) -> None:
        """A base64 message/delivery-status whose blocks max_parts cut off is an empty attachment, not an error."""
        raw = b"Content-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n\r\nA: 1\r\n"
        result = parse_message(raw, max_parts=1)
        self.assertEqual([(a["content_type"], a["size"]) for a in result["attachments"]], [("message/delivery-status", 0)])
        self.assertEqual(result["defects"], ["max_parts exceeded"])

    def test_nested_delivery_status_blocks(self) -> None:
        """A delivery-status block claiming to be delivery-status itself is still written out."""
        raw = b"Content-Type: message/delivery-status\r\n\r\nA: 1\r\n\r\nContent-Type: message/delivery-status\r\nB: 2\r\n"
        result = parse_message(raw, inline_attachment_limit=1000)
        content = base64.b64decode(result["attachments"][0]["content"])
        self.assertEqual(content, b"A: 1\r\n\r\nContent-Type: message/delivery-status\r\nB: 2\r\n\r\n")
        self.assertEqual(result["defects"], [])


class BoundsTests(SynchronousTestCase):
    """max_depth, max_parts and the MIME header budget."""

    def test_deep_nesting_bounded(self) -> None:
        """Multiparts nested beyond max_depth are not parsed into, and that is recorded."""
        result = parse_message(nested_multipart(30))
        self.assertIsNone(result["text"])
        self.assertEqual(result["attachments"], [])
        self.assertIn("max_depth exceeded", result["defects"])
        shallow = parse_message(nested_multipart(30), max_depth=40)
        self.assertEqual(shallow["text"], "deep")
        self.assertNotIn("max_depth exceeded", shallow["defects"])

    def test_depth_limit_is_exact(self) -> None:
        """A leaf at exactly max_depth is reached; one level deeper is not."""
        self.assertEqual(parse_message(nested_multipart(3), max_depth=3)["text"], "deep")
        self.assertIsNone(parse_message(nested_multipart(4), max_depth=3)["text"])

    def test_very_deep_nesting_is_cheap(self) -> None:
        """Hundreds of nesting levels around many lines stop at max_depth (unbounded, this takes seconds)."""
        result = parse_message(nested_multipart(800, "Content-Type: text/plain\n\n" + "a\n" * 20000))
        self.assertIsNone(result["text"])
        self.assertIn("max_depth exceeded", result["defects"])

    def test_deep_message_nesting(self) -> None:
        """Thousands of nested message/rfc822 levels are one opaque attachment, not a recursion error."""
        raw = b"Content-Type: message/rfc822\r\n\r\n" * 5000 + b"Subject: x\r\n\r\nhi"
        result = parse_message(raw)
        self.assertEqual([a["content_type"] for a in result["attachments"]], ["message/rfc822"])
        self.assertEqual(result["attachments"][0]["size"], len(raw) - len(b"Content-Type: message/rfc822\r\n\r\n"))
        self.assertEqual(result["defects"], [])

    def test_max_parts_bounded(self) -> None:
        """Parsing stops at max_parts parts, keeping the parts before the cut."""
        raw = (
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
            + b"".join(b"--b\r\n\r\npart %d\r\n" % n for n in range(10000))
            + b"--b--\r\n"
        )
        result = parse_message(raw, max_parts=10)
        self.assertEqual(result["text"], "\n".join(f"part {n}" for n in range(9)))
        self.assertIn("max_parts exceeded", result["defects"])

    def test_mime_header_budget(self) -> None:
        """Overlong MIME headers are cut, and too many in total stop the parse."""
        parts = b"".join(b'--b\r\nContent-Type: text/plain; x="' + b"y" * 3000 + b'"\r\n\r\npart\r\n' for _ in range(100))
        result = parse_message(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n")
        self.assertIn("mime header too long", result["defects"])
        self.assertIn("mime header budget exceeded", result["defects"])
        # 27 characters of top-level Content-Type, then 2048 per part: the 64th part breaks 128 KiB
        self.assertEqual(result["text"], "\n".join(["part"] * 63))

    def test_top_level_mime_header_budget(self) -> None:
        """At the top level, MIME headers past the budget are dropped rather than stopping the parse."""
        raw = b"Content-Type: text/plain; x=" + b"y" * 2000 + b"\r\n"
        result = parse_message(raw * 70 + b"Subject: s\r\n\r\nbody")
        self.assertEqual((result["subject"], result["text"], len(result["headers"])), ("s", "body", 66))
        self.assertEqual(result["defects"], ["mime header budget exceeded"])


class HeaderSummaryTests(SynchronousTestCase):
    """parse_header_summary: the cheap header-only view."""

    def test_summary_fields(self) -> None:
        """The summary has the subject, message id and From/To/Cc addresses."""
        raw = crlf(
            "From: =?utf-8?q?Zo=C3=AB?= <zoe@example.org>\n"
            "To: a@example.com, Team: b@example.com;\n"
            "Cc: c@example.com\n"
            "Subject: =?utf-8?q?R=C3=A9union?=\n"
            "Message-ID: <s1@example.org> \n"
            "\n"
            "body"
        )
        self.assertEqual(
            parse_header_summary(raw),
            {
                "subject": "R\u00e9union",
                "message_id": "<s1@example.org>",
                "from": [{"address": "zoe@example.org", "name": "Zo\u00eb"}],
                "to": [{"address": "a@example.com", "name": None}, {"address": "b@example.com", "name": None}],
                "cc": [{"address": "c@example.com", "name": None}],
            },
        )

    def test_summary_stops_at_blank_line(self) -> None:
        """Header-like lines in the body are not read."""
        raw = b"Subject: real\n\nSubject: fake\nTo: nobody@example.com\n"
        self.assertEqual(parse_header_summary(raw), {"subject": "real", "message_id": None, "from": [], "to": [], "cc": []})

    def test_summary_max_header_bytes(self) -> None:
        """Only the first max_header_bytes bytes are looked at."""
        raw = b"Subject: first\r\nTo: late@example.com\r\n\r\n"
        summary = parse_header_summary(raw, max_header_bytes=16)
        self.assertEqual(summary, {"subject": "first", "message_id": None, "from": [], "to": [], "cc": []})

    def test_summary_of_garbage(self) -> None:
        """Garbage and empty input give an empty summary."""
        empty: dict[str, Any] = {"subject": None, "message_id": None, "from": [], "to": [], "cc": []}
        self.assertEqual(parse_header_summary(b""), empty)
        self.assertEqual(parse_header_summary(b"\x00\xff\xfe garbage"), empty)
        self.assertEqual(parse_header_summary("not bytes"), empty)  # type: ignore[arg-type]


# Strategies for generated messages -------------------------------------------

CHARSET_NAMES = st.sampled_from(
    ["utf-8", "UTF8", "iso-8859-1", "windows-1252", "us-ascii", "koi8-r", "shift_jis", "gb2312", "utf-16", "utf-7"]
    + ["x-unknown", "", "idna", "base64", "unicode_escape", "undefined", '"utf-8"', "utf-8'en'", "x-\u00e9", "a\x00b"]
)
HEADER_NAMES = st.sampled_from(
    ["Subject", "From", "To", "Cc", "Bcc", "Reply-To", "Sender", "Date", "Message-ID", "In-Reply-To", "References"]
    + ["Content-Type", "Content-Disposition", "Content-Transfer-Encoding", "Content-ID", "MIME-Version", "X-Mailer"]
)
CTES = st.sampled_from(["base64", "quoted-printable", "7bit", "8bit", "binary", "x-uuencode", "bogus", ""])
CONTENT_TYPES = st.sampled_from(
    ["text/plain", "text/html", "text/calendar", "image/png", "application/pdf", "message/rfc822", "message/delivery-status", "bogus"]
)
BOUNDARIES = st.text(alphabet=st.sampled_from("abcXYZ09'()+_,-./:=? \"\u00e9\t"), max_size=72)
SOME_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)


@st.composite
def encoded_words(draw: st.DrawFn) -> str:
    """An RFC 2047 encoded word, valid or not."""
    charset = draw(CHARSET_NAMES)
    encoding = draw(st.sampled_from(["q", "b", "Q", "B", "x", ""]))
    payload = draw(st.one_of(st.text(alphabet="abcABC=_?+/0123456789", max_size=20), st.just("w6l0w6k="), st.just("caf=E9")))
    end = draw(st.sampled_from(["?=", "?=", ""]))
    return f"=?{charset}?{encoding}?{payload}{end}"


@st.composite
def header_values(draw: st.DrawFn) -> str:
    """A header value mixing text, addresses, encoded words and odd characters."""
    pieces = draw(
        st.lists(
            st.one_of(
                SOME_TEXT,
                encoded_words(),
                st.sampled_from(
                    ["<a@b.c>", '"Q, uoted"', "(comment", ")", ",", ";", ":", "@", "\\", "Group:", "a@example.com", "\r\n ", "\x00"]
                ),
                st.sampled_from(["Wed, 25 Nov 2026 14:30:00 -0500", "multipart/mixed; boundary=x", "attachment; filename*=utf-8''%E9%ZZ"]),
            ),
            max_size=4,
        )
    )
    return " ".join(pieces)


@st.composite
def leaf_parts(draw: st.DrawFn) -> bytes:
    """A non-multipart part: headers and a body in some charset and encoding."""
    content_type = draw(CONTENT_TYPES)
    charset = draw(CHARSET_NAMES)
    cte = draw(CTES)
    body = draw(st.one_of(st.binary(max_size=120), SOME_TEXT.map(lambda text: text.encode("utf-8"))))
    if cte == "base64" and draw(st.booleans()):
        body = base64.encodebytes(body)
    elif cte == "quoted-printable" and draw(st.booleans()):
        body = quopri.encodestring(body)
    headers = [f"Content-Type: {content_type}; charset={charset}".encode("utf-8", "surrogatepass")]
    if cte:
        headers.append(f"Content-Transfer-Encoding: {cte}".encode())
    if draw(st.booleans()):
        disposition = draw(st.sampled_from(["attachment", "inline", "bogus"]))
        name = draw(st.one_of(SOME_TEXT, encoded_words()))
        headers.append(f'Content-Disposition: {disposition}; filename="{name}"'.encode("utf-8", "surrogatepass"))
    if draw(st.booleans()):
        headers.append(b"Content-ID: <" + draw(st.binary(max_size=10)).replace(b"\n", b"") + b">")
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


def multipart(children: list[bytes], boundary: str, subtype: str) -> bytes:
    """Join parts under one multipart header with ``boundary``."""
    marker = ("--" + boundary).encode()
    header = f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\npreamble\r\n'.encode()
    return header + b"".join(marker + b"\r\n" + child + b"\r\n" for child in children) + marker + b"--\r\nepilogue"


MIME_TREES = st.recursive(
    leaf_parts(),
    lambda children: st.builds(
        multipart, st.lists(children, max_size=4), BOUNDARIES, st.sampled_from(["mixed", "alternative", "related", "digest"])
    ),
    max_leaves=5,
)


@st.composite
def header_sections(draw: st.DrawFn) -> bytes:
    """Generated top-level headers, without the blank line after them."""
    headers = draw(st.lists(st.tuples(HEADER_NAMES, header_values()), max_size=6))
    return b"".join(f"{name}: {value}\r\n".encode("utf-8", "surrogatepass") for name, value in headers)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A whole message: generated headers over a MIME tree, maybe truncated, maybe with LF line ends."""
    raw = draw(header_sections()) + draw(MIME_TREES)
    if draw(st.booleans()):
        raw = raw.replace(b"\r\n", b"\n")
    cut = draw(st.integers(min_value=0, max_value=len(raw)))
    return raw[:cut] if draw(st.booleans()) else raw


class PropertyTests(SynchronousTestCase):
    """Generated input: the parsers never raise and always return serialisable results."""

    @PROPERTY_SETTINGS
    @given(raw=st.binary(max_size=2000))
    def test_arbitrary_bytes(self, raw: bytes) -> None:
        """Arbitrary bytes never raise and give a well-formed, JSON-serialisable result."""
        assert_shape(parse_message(raw, inline_attachment_limit=64))

    @PROPERTY_SETTINGS
    @given(raw=messages(), max_depth=st.integers(min_value=0, max_value=4), max_parts=st.integers(min_value=1, max_value=12))
    def test_generated_messages(self, raw: bytes, max_depth: int, max_parts: int) -> None:
        """Structured messages with random charsets, boundaries, encodings and truncation never raise."""
        result = parse_message(raw, max_depth=max_depth, max_parts=max_parts, max_headers=5, inline_attachment_limit=64)
        assert_shape(result)
        self.assertLessEqual(len(result["headers"]), 5)
        self.assertLessEqual(len(result["attachments"]), max_parts)

    @PROPERTY_SETTINGS
    @given(
        raw=st.one_of(st.binary(max_size=1000), st.builds(bytes.__add__, header_sections(), st.binary(max_size=200))),
        limit=st.integers(min_value=0, max_value=2000),
    )
    def test_header_summary_never_raises(self, raw: bytes, limit: int) -> None:
        """parse_header_summary never raises and returns its five keys, JSON-serialisable."""
        summary = parse_header_summary(raw, max_header_bytes=limit)
        self.assertEqual(set(summary), SUMMARY_KEYS)
        assert_json_ready(summary)


class ShortcutTests(SynchronousTestCase):
    """The shortcuts for everyday From/To values and dates agree with the full parsers."""

    @PROPERTY_SETTINGS
    @given(
        name=st.from_regex(r"([A-Za-z0-9\-_.\"(),=?]{0,8}[ \t]{0,2}){0,3}", fullmatch=True),
        local=st.from_regex(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~\-\"]{0,12}", fullmatch=True),
        domain=st.from_regex(r"[A-Za-z0-9.\-\[\]]{0,20}", fullmatch=True),
        form=st.sampled_from(["{name} <{local}@{domain}>", "<{local}@{domain}>", "{local}@{domain}", " {name}<{local}@{domain}> ", "{name}"]),
    )
    def test_mailbox_shortcut_agrees(self, name: str, local: str, domain: str, form: str) -> None:
        """Whatever the shortcut reads, the header parser reads the same, without defects."""
        entry = form.format(name=name, local=local, domain=domain)
        simple = simple_mailbox(entry)
        if simple is None:
            return
        msg = EmailMessage(policy=_POLICY)
        defects = _Defects()
        self.assertEqual(_parse_address_full(msg, "To", entry, "to", defects), [simple])
        self.assertEqual(defects.as_list(), [])

    def test_mailbox_shortcut_takes_everyday_forms(self) -> None:
        """Plain forms take the shortcut; quoted, encoded or commented ones do not."""
        self.assertEqual(simple_mailbox("Bench Mark <bench@example.org>"), {"address": "bench@example.org", "name": "Bench Mark"})
        self.assertEqual(simple_mailbox(" <a.b@example.org>"), {"address": "a.b@example.org", "name": None})
        self.assertEqual(simple_mailbox("a+b@mx.example.org"), {"address": "a+b@mx.example.org", "name": None})
        for entry in ('"Smith, J" <j@example.org>', "=?utf-8?q?J=C3=BCrgen?= <j@example.org>", "J. Smith <j@example.org>", "j@example.org (J)", "Group: a@b.c;"):
            self.assertIsNone(simple_mailbox(entry), entry)

    @PROPERTY_SETTINGS
    @given(
        moment=st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)),
        offset=st.integers(min_value=-23 * 60, max_value=23 * 60),
        garble=st.sampled_from(["", " ", "x", " (comment)", "\r\n ", "-0000"]),
    )
    def test_date_shortcut_agrees(self, moment: datetime, offset: int, garble: str) -> None:
        """A date read directly gives what the DateHeader path gives."""
        text = format_datetime(moment.replace(microsecond=0, tzinfo=timezone(timedelta(minutes=offset)))) + garble
        fast = _date(_raw_date_message(text), _Defects())
        header = _POLICY.header_fetch_parse("Date", text.replace("\r", "").replace("\n", ""))
        slow = header.datetime
        if slow is None:
            self.assertIsNone(fast)
            return
        if slow.tzinfo is None:
            slow = slow.replace(tzinfo=UTC)
        self.assertEqual(fast, slow.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z")


def _raw_date_message(text: str) -> Any:
    """A parsed message whose Date header is ``text`` exactly."""
    return BytesHeaderParser(policy=_POLICY).parsebytes(b"Date: " + text.encode("ascii") + b"\r\n\r\n")


class HeaderAddressesTests(SynchronousTestCase):
    def test_addresses_from_folded_headers_only_in_the_header_section(self) -> None:
        """From/To/Cc addresses come from the headers (folded lines joined), never from the body."""
        raw = b"From: Alice <a@example.org>\r\nTo: b@example.com,\r\n  \"C, D\" <c@example.com>\r\nSubject: x\r\n\r\nTo: body@example.com\r\n"
        self.assertEqual(
            header_addresses(raw, ("from", "to", "cc")),
            {"from": ["a@example.org"], "to": ["b@example.com", "c@example.com"], "cc": []},
        )

    @given(st.binary(max_size=2000))
    @settings(max_examples=200, deadline=None)
    def test_never_raises(self, raw: bytes) -> None:
        """Any bytes give lists of strings."""
        result = header_addresses(raw, ("from", "to"))
        self.assertEqual(set(result), {"from", "to"})
        self.assertTrue(all(isinstance(a, str) for v in result.values() for a in v))
