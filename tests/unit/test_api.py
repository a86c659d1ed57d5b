"""Tests for gomail.api through StubTreq: ingestion, auth, errors, limits."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from gomail.api import APISite, HTTPApi
from gomail.errors import StorageFailed
from gomail.interfaces import Envelope, IRecipientPolicy, ISpool, StoredMessage
from gomail.limiter import LimiterService, RateLimitRules
from gomail.metrics import GomailMetrics

TOKEN = "Zq7mV2xR9pL4tW8kN3bH6yF1cJ5sD0gA-eU"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RAW = b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.com>\r\nSubject: Hi\r\n\r\nHello\r\n"


@implementer(ISpool)
class FakeSpool:
    def __init__(self) -> None:
        self.stored: list[tuple[Envelope, bytes]] = []
        self.error: Exception | None = None
        self.writable = True
        self.pending: Deferred[StoredMessage] | None = None

    def begin(self) -> Any:  # pragma: no cover - not used by the API
        raise NotImplementedError

    def store(self, envelope: Envelope, raw: bytes) -> Deferred[StoredMessage]:
        if self.error is not None:
            return fail(self.error)
        self.stored.append((envelope, raw))
        if self.pending is not None:
            return self.pending
        return succeed(StoredMessage(f"01JD000000000000000000000{len(self.stored)}", "2026-11-25T19:30:00.000Z", len(raw)))

    def is_writable(self) -> bool:
        return self.writable


@implementer(IRecipientPolicy)
class Domains:
    def accepts(self, address: str) -> bool:
        return address.lower().endswith("@example.com")


class APITestBase(SynchronousTestCase):
    max_body = 26214400

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.spool = FakeSpool()
        self.metrics = GomailMetrics(CollectorRegistry())
        self.limiter = LimiterService(RateLimitRules(), self.clock, self.metrics)
        self.api = HTTPApi(self.spool, Domains(), TOKEN, self.clock, self.metrics, limiter=self.limiter)
        self.stub = StubTreq(self.api.resource())
        self.stub._agent._serverFactory = APISite(self.api.resource(), self.max_body, self.metrics, self.clock)

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[Any, Any]:
        response = self.successResultOf(self.stub.request(method, f"http://gomail.test{path}", **kwargs))
        body = self.successResultOf(response.content())
        try:
            doc = json.loads(body)
        except ValueError:
            doc = body
        return response, doc

    def post_raw(self, raw: bytes = RAW, headers: dict[str, str] | None = None, path: str = "/mail/inbound") -> tuple[Any, Any]:
        h = {**AUTH, "Content-Type": "message/rfc822", **(headers or {})}
        return self.request("POST", path, data=raw, headers=h)


class IngestTests(APITestBase):
    def test_raw_message_is_accepted_with_envelope_headers(self) -> None:
        """A raw message with X-Original-* headers gets 202 and that envelope."""
        response, doc = self.post_raw(
            headers={
                "X-Original-Recipient": "bob@example.com, carol@example.com",
                "X-Original-Sender": "bounce@example.org",
                "X-Original-Client-Address": "198.51.100.7",
                "X-Original-Client-Hostname": "mx.example.org",
                "X-Original-Helo": "mx.example.org",
            }
        )
        self.assertEqual(response.code, 202)
        self.assertEqual(doc, {"id": "01JD0000000000000000000001", "status": "accepted", "received_at": "2026-11-25T19:30:00.000Z"})
        ((envelope, raw),) = self.spool.stored
        self.assertEqual(raw, RAW)
        self.assertEqual(envelope.rcpt_to, ("bob@example.com", "carol@example.com"))
        self.assertEqual(envelope.mail_from, "bounce@example.org")
        self.assertEqual(envelope.client_address, "198.51.100.7")
        self.assertEqual(envelope.client_hostname, "mx.example.org")
        self.assertEqual(envelope.helo, "mx.example.org")
        self.assertEqual(envelope.transport, "http")

    def test_repeated_recipient_headers_add_up(self) -> None:
        """X-Original-Recipient may repeat."""
        h = {**AUTH, "Content-Type": "message/rfc822"}
        response = self.successResultOf(
            self.stub.post(
                "http://gomail.test/mail/inbound",
                data=RAW,
                headers={**h, "X-Original-Recipient": ["a@example.com", "b@example.com"]},
            )
        )
        self.assertEqual(response.code, 202)
        self.assertEqual(self.spool.stored[0][0].rcpt_to, ("a@example.com", "b@example.com"))

    def test_envelope_falls_back_to_from_and_to(self) -> None:
        """Without envelope headers the envelope comes from From and To."""
        response, _ = self.post_raw(path="/email")
        self.assertEqual(response.code, 202)
        envelope = self.spool.stored[0][0]
        self.assertEqual((envelope.mail_from, envelope.rcpt_to), ("alice@example.org", ("bob@example.com",)))

    def test_json_body(self) -> None:
        """The JSON form carries sender, recipients, raw and connection."""
        body = {"sender": "a@example.org", "recipients": ["x@example.com"], "raw": RAW.decode(), "connection": {"client_address": "192.0.2.1", "client_helo": "h"}}
        response, doc = self.request("POST", "/mail/inbound", json=body, headers=AUTH)
        self.assertEqual(response.code, 202)
        envelope, raw = self.spool.stored[0]
        self.assertEqual(raw, RAW)
        self.assertEqual((envelope.mail_from, envelope.rcpt_to, envelope.client_address, envelope.helo), ("a@example.org", ("x@example.com",), "192.0.2.1", "h"))

    def test_json_errors_name_the_fields(self) -> None:
        """Bad JSON is 400 syntax; missing fields are 422 validation with details."""
        response, doc = self.request("POST", "/mail/inbound", data=b"{nope", headers={**AUTH, "Content-Type": "application/json"})
        self.assertEqual(response.code, 400)
        self.assertEqual(doc["error"]["category"], "syntax")
        response, doc = self.request("POST", "/mail/inbound", json={"sender": 5}, headers=AUTH)
        self.assertEqual(response.code, 422)
        self.assertEqual(doc["error"]["category"], "validation")
        self.assertEqual(set(doc["error"]["details"]["fields"]), {"raw", "recipient", "sender"})

    def test_foreign_recipient_is_refused(self) -> None:
        """A recipient outside the configured domains is 403 policy; nothing stored."""
        response, doc = self.post_raw(headers={"X-Original-Recipient": "x@elsewhere.net"})
        self.assertEqual(response.code, 403)
        self.assertEqual(doc["error"]["category"], "policy")
        self.assertEqual(doc["error"]["details"], {"refused": ["x@elsewhere.net"]})
        self.assertEqual(self.spool.stored, [])
        rejected = self.metrics.registry.get_sample_value("gomail_messages_rejected_total", {"transport": "http", "category": "policy"})
        self.assertEqual(rejected, 1.0)

    def test_storage_failure_is_507(self) -> None:
        """A spool failure is 507 storage with Retry-After."""
        self.spool.error = StorageFailed("the spool's disk is full", retry_after=60)
        response, doc = self.post_raw()
        self.assertEqual(response.code, 507)
        self.assertEqual(doc["error"]["category"], "storage")
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["60"])

    def test_reply_waits_for_the_durable_write(self) -> None:
        """No response is sent until the spool's Deferred fires."""
        self.spool.pending = Deferred()
        d = self.stub.post("http://gomail.test/mail/inbound", data=RAW, headers={**AUTH, "Content-Type": "message/rfc822"})
        self.assertNoResult(d)
        self.spool.pending.callback(StoredMessage("01JD0000000000000000000009", "2026-11-25T19:30:00.000Z", 10))
        self.stub.flush()
        self.assertEqual(self.successResultOf(d).code, 202)

    def test_unsupported_content_type(self) -> None:
        """Another content type is 415."""
        response, doc = self.post_raw(headers={"Content-Type": "text/csv"})
        self.assertEqual(response.code, 415)


class AuthTests(APITestBase):
    def test_missing_wrong_and_prefixless_tokens_are_401(self) -> None:
        """No header, a wrong token or a token without 'Bearer ' all get 401 authentication."""
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
            response, doc = self.request("POST", "/mail/inbound", data=RAW, headers={"Content-Type": "message/rfc822", **headers})
            self.assertEqual(response.code, 401)
            self.assertEqual(doc["error"]["category"], "authentication")
            self.assertEqual(response.headers.getRawHeaders("WWW-Authenticate"), ['Bearer realm="gomail"'])
        self.assertEqual(self.spool.stored, [])


class ShapeTests(APITestBase):
    def test_request_id_is_kept_or_generated(self) -> None:
        """A sane X-Request-ID is echoed; an insane one is replaced."""
        response, doc = self.request("GET", "/health", headers={"X-Request-ID": "abc-123"})
        self.assertEqual(response.headers.getRawHeaders("X-Request-ID"), ["abc-123"])
        response, _ = self.request("GET", "/health", headers={"X-Request-ID": "bad id\u00e9{}"})
        (rid,) = response.headers.getRawHeaders("X-Request-ID")
        self.assertRegex(rid, r"^[0-9a-f]{32}$")

    def test_unknown_path_is_json_404_and_wrong_method_405(self) -> None:
        """Unknown paths and wrong methods get JSON errors."""
        response, doc = self.request("GET", "/nope", headers={"X-Request-ID": "r1"})
        self.assertEqual(response.code, 404)
        self.assertEqual(doc, {"error": {"category": "not_found", "message": "no such path", "request_id": "r1", "details": {"path": "/nope"}}})
        response, doc = self.request("GET", "/mail/inbound")
        self.assertEqual(response.code, 405)
        self.assertEqual(doc["error"]["category"], "syntax")
        self.assertEqual(response.headers.getRawHeaders("Allow"), ["POST"])

    def test_health_and_ready(self) -> None:
        """/health reports version and uptime; /ready turns 503 when the spool is not writable or on shutdown."""
        self.clock.advance(5)
        response, doc = self.request("GET", "/health")
        self.assertEqual((response.code, doc["status"], doc["uptime"]), (200, "ok", 5.0))
        response, doc = self.request("GET", "/ready")
        self.assertEqual((response.code, doc["status"]), (200, "ready"))
        self.spool.writable = False
        response, doc = self.request("GET", "/ready")
        self.assertEqual((response.code, doc["checks"]["spool_writable"]), (503, False))
        self.spool.writable = True
        self.api.shutting_down = True
        response, doc = self.request("GET", "/ready")
        self.assertEqual((response.code, doc["checks"]["not_shutting_down"]), (503, False))

    def test_shutting_down_refuses_new_requests_with_503(self) -> None:
        """During shutdown ingestion gets 503 unavailable with Retry-After."""
        self.api.shutting_down = True
        response, doc = self.post_raw()
        self.assertEqual(response.code, 503)
        self.assertEqual(doc["error"]["category"], "unavailable")
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["30"])

    def test_metrics_endpoint(self) -> None:
        """/metrics serves the Prometheus text with request counts."""
        self.post_raw()
        response, body = self.request("GET", "/metrics")
        self.assertEqual(response.code, 200)
        text = body.decode()
        self.assertIn('gomail_http_request_duration_seconds_count{method="POST",route="/mail/inbound",status="202"} 1.0', text)
        self.assertIn("gomail_http_requests_in_flight", text)


class BodyLimitTests(APITestBase):
    max_body = 100

    def test_body_over_the_limit_is_413(self) -> None:
        """A body over max_body_size is 413 too_large and nothing is stored."""
        response, doc = self.post_raw(raw=b"x" * 101)
        self.assertEqual(response.code, 413)
        self.assertEqual(doc["error"]["category"], "too_large")
        self.assertEqual(doc["error"]["details"], {"limit": 100})
        self.assertEqual(self.spool.stored, [])

    def test_body_at_the_limit_is_accepted(self) -> None:
        """Exactly max_body_size bytes is fine."""
        raw = RAW + b"y" * (100 - len(RAW))
        response, _ = self.post_raw(raw=raw, headers={"X-Original-Recipient": "bob@example.com"})
        self.assertEqual(response.code, 202)
        self.assertEqual(self.spool.stored[0][1], raw)


class RateLimitTests(APITestBase):
    def test_burst_then_429_with_headers(self) -> None:
        """After the burst of 10 the next request is 429 rate_limited with Retry-After and X-RateLimit-*."""
        codes = []
        for _ in range(11):
            response, doc = self.post_raw()
            codes.append(response.code)
        self.assertEqual(codes, [202] * 10 + [429])
        self.assertEqual(doc["error"]["category"], "rate_limited")
        self.assertEqual(response.headers.getRawHeaders("X-RateLimit-Limit"), ["10"])
        self.assertEqual(response.headers.getRawHeaders("X-RateLimit-Remaining"), ["0"])
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["1"])
        self.assertEqual(len(self.spool.stored), 10)
        response, _ = self.request("GET", "/health")
        self.assertEqual(response.code, 200)
