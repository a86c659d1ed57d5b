"""Tests for gomail.delivery.signing against the independent standardwebhooks package."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from twisted.trial.unittest import SynchronousTestCase

from gomail.delivery.signing import secret_key, sign, signature_header

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BODY = b'{"type":"message.received","id":"01JD"}'


class SigningTests(SynchronousTestCase):
    """Standard Webhooks signatures."""

    def test_matches_standardwebhooks_sign(self) -> None:
        """sign gives what standardwebhooks' Webhook.sign gives."""
        expected = Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(1700000000, tz=UTC), BODY.decode())
        self.assertEqual(sign(SECRET, "msg_1", 1700000000, BODY), expected)

    def test_header_verifies(self) -> None:
        """A header with two secrets verifies with either secret."""
        other = "whsec_" + base64.b64encode(b"another key, rotated in").decode()
        now = int(time.time())
        header = signature_header((SECRET, other), "msg_2", now, BODY)
        headers = {"webhook-id": "msg_2", "webhook-timestamp": str(now), "webhook-signature": header}
        self.assertEqual(len(header.split(" ")), 2)
        self.assertEqual(Webhook(SECRET).verify(BODY, headers), {"type": "message.received", "id": "01JD"})
        Webhook(other).verify(BODY, headers)
        self.assertRaises(WebhookVerificationError, Webhook("whsec_" + base64.b64encode(b"wrong").decode()).verify, BODY, headers)

    def test_tampered_body_fails(self) -> None:
        """A changed body does not verify."""
        now = int(time.time())
        headers = {"webhook-id": "m", "webhook-timestamp": str(now), "webhook-signature": signature_header((SECRET,), "m", now, BODY)}
        self.assertRaises(WebhookVerificationError, Webhook(SECRET).verify, BODY + b" ", headers)

    def test_raw_secret_is_utf8(self) -> None:
        """A secret without whsec_ is used as its UTF-8 bytes."""
        self.assertEqual(secret_key("pässword"), "pässword".encode())
        expected = Webhook("pässword".encode()).sign("m", datetime.fromtimestamp(5, tz=UTC), "body")
        self.assertEqual(sign("pässword", "m", 5, b"body"), expected)

    def test_whsec_without_padding(self) -> None:
        """A whsec_ secret may leave out base64 padding."""
        self.assertEqual(secret_key("whsec_YWJj"), b"abc")
        self.assertEqual(secret_key("whsec_YWI"), b"ab")

    def test_bad_secrets(self) -> None:
        """Invalid base64 after whsec_ and empty secrets are refused."""
        self.assertRaises(ValueError, secret_key, "whsec_!!!")
        self.assertRaises(ValueError, secret_key, "")
        self.assertRaises(ValueError, secret_key, "whsec_")

    def test_no_secrets_empty_header(self) -> None:
        """No secret gives an empty header value."""
        self.assertEqual(signature_header((), "m", 1, b""), "")
