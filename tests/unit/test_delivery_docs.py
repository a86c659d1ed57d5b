"""Keeps docs/payload.md in step with gomail.delivery.payload."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from gomail.delivery.jobs import job_id
from gomail.delivery.payload import payload_document
from gomail.delivery.settings import RouteSettings
from gomail.delivery.testing import sample_record
from gomail.parser import parse_message

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "payload.md")
RAW = (
    b"From: Alice Example <alice@example.org>\r\nTo: Support <support@example.com>\r\nCc: bob@example.org\r\n"
    b"Subject: =?utf-8?q?Invoice_f=C3=BCr_November?=\r\nDate: Wed, 25 Nov 2026 19:29:58 +0000\r\n"
    b"Message-ID: <CAF1234@mail.example.org>\r\nIn-Reply-To: <prev@example.com>\r\nReferences: <prev@example.com>\r\n"
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
    b'Content-Type: multipart/alternative; boundary="b2"\r\n\r\n--b2\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n'
    b"Hello, the invoice is attached.\r\n"
    b"--b2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hello, the invoice is attached.</p>\r\n--b2--\r\n"
    b'--b1\r\nContent-Type: text/csv; name="invoice.csv"\r\nContent-Disposition: attachment; filename="invoice.csv"\r\n\r\n'
    b"item,amount\r\nwidgets,42\r\n--b1--\r\n"
)


def json_blocks() -> list[Any]:
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.S)]


def check(schema: dict[str, Any], value: Any, defs: dict[str, Any], path: str = "$") -> list[str]:
    """A small JSON Schema subset check: type, const, enum, required, properties, items, oneOf, $ref."""
    if "$ref" in schema:
        return check(defs[schema["$ref"].rsplit("/", 1)[1]], value, defs, path)
    if "oneOf" in schema:
        matches = [s for s in schema["oneOf"] if not check(s, value, defs, path)]
        return [] if len(matches) == 1 else [f"{path}: matches {len(matches)} of oneOf"]
    errors = []
    names = {"string": str, "integer": int, "boolean": bool, "object": dict, "array": list, "null": type(None)}
    types = schema.get("type")
    if types is not None:
        allowed = tuple(names[t] for t in ([types] if isinstance(types, str) else types))
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            return [f"{path}: {type(value).__name__} is not {types}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: not in {schema['enum']}")
    if isinstance(value, dict):
        errors += [f"{path}: missing {key}" for key in schema.get("required", []) if key not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += check(sub, value[key], defs, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += check(schema["items"], item, defs, f"{path}[{i}]")
    return errors


class PayloadDocTests(SynchronousTestCase):
    """docs/payload.md matches the code."""

    def setUp(self) -> None:
        self.example, self.schema = json_blocks()
        record = sample_record("01JDQ7M3Y8K2P4R6T8V0W2X4Y6", ("support+billing@example.com",), size=len(RAW), authentication={})
        record["message"] = parse_message(RAW)
        route = RouteSettings(name="support", match=("support@example.com",), url="https://h/", raw="base64", inline_attachments_max=65536)
        self.generated = payload_document(record, RAW, route, ["support+billing@example.com"], job_id(record["id"], "support"))

    def test_example_is_what_the_code_makes(self) -> None:
        """The full example equals the payload built from its message (raw content aside)."""
        self.assertTrue(self.generated["raw"]["content"].startswith(self.example["raw"]["content"].rstrip(".")))
        self.example["raw"]["content"] = self.generated["raw"]["content"]
        self.assertEqual(self.example, self.generated)

    def test_payloads_match_the_schema(self) -> None:
        """The example and the payload in every raw mode satisfy the documented schema."""
        defs = self.schema["$defs"]
        self.assertEqual(check(self.schema, self.example, defs), [])
        record = sample_record()
        for mode in ("never", "base64", "multipart"):
            route = RouteSettings(name="r", match=("*",), url="https://h/", raw=mode)
            self.assertEqual(check(self.schema, payload_document(record, b"raw", route, ["app@example.com"], "j-1"), defs), [], mode)
        self.assertNotEqual(check(self.schema, {**self.example, "size": "big"}, defs), [])

    def test_schema_lists_every_field(self) -> None:
        """The schema requires exactly the fields the code sends."""
        self.assertEqual(self.schema["required"], list(self.generated))
        self.assertEqual(self.schema["properties"]["envelope"]["required"], list(self.generated["envelope"]))
        self.assertEqual(self.schema["properties"]["message"]["required"], list(self.generated["message"]))
