"""Tests for the service tree wiring, the processor and the twistd plugin's helpers."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from gomail.config import load
from gomail.processor import MessageProcessor
from gomail.service import build_service
from gomail.spool import SpoolLayout
from gomail.tap import Options, ensure_token, read_for_reload
from tests.fakes import ManualThreadPool, ThreadlessReactor
from tests.tls_files import write_certificate

TOKEN = "Zq7mV2xR9pL4tW8kN3bH6yF1cJ5sD0gA-eU"


class BuildServiceTests(SynchronousTestCase):
    def test_build_has_no_side_effects_and_listens_on_start(self) -> None:
        """Building binds nothing and touches no file; the privileged start binds both endpoints."""
        data_dir = os.path.abspath(self.mktemp())
        config = load(None, {}, {"data_dir": data_dir, "http.listen": "tcp:3100:interface=127.0.0.1", "smtp.listen": "tcp:2600:interface=127.0.0.1"})
        reactor = MemoryReactorClock()
        root = build_service(config, reactor, TOKEN, CollectorRegistry())
        self.assertEqual(reactor.tcpServers, [])
        self.assertFalse(os.path.exists(data_dir))
        self.assertEqual([listener.name for listener in root.listeners], ["http", "smtp"])
        root.privilegedStartService()
        self.assertEqual([(port, interface) for port, _factory, _backlog, interface in reactor.tcpServers], [(3100, "127.0.0.1"), (2600, "127.0.0.1")])
        self.assertIs(reactor.tcpServers[0][1], root.site)
        self.assertIs(reactor.tcpServers[1][1], root.smtp)

    def test_smtp_can_be_disabled_and_routes_make_a_delivery_service(self) -> None:
        """smtp.enabled false leaves one listener; a route creates the delivery service."""
        config = load(
            None,
            {},
            {
                "data_dir": self.mktemp(),
                "smtp.enabled": False,
                "domains": ["example.com"],
                "routes": [{"name": "app", "match": ["*@example.com"], "url": "http://127.0.0.1:9/hook"}],
            },
        )
        root = build_service(config, MemoryReactorClock(), TOKEN, CollectorRegistry(), http_client=object())
        self.assertEqual([listener.name for listener in root.listeners], ["http"])
        self.assertIsNone(root.smtp)
        self.assertIsNotNone(root.delivery)
        self.assertTrue(root.router.accepts("x@example.com"))  # type: ignore[attr-defined]
        self.assertFalse(root.router.accepts("x@example.net"))  # type: ignore[attr-defined]


class TLSReloadTests(SynchronousTestCase):
    def test_certificate_is_loaded_and_reloaded(self) -> None:
        """The SMTP factory gets TLS options from smtp.tls; SIGHUP's reading (in a
        thread) makes new ones from the renewed files, and reload applies them."""
        cert, key = write_certificate(self.mktemp())
        config_path = self.mktemp()
        with open(config_path, "w") as f:
            f.write(f"data_dir: {self.mktemp()}\nsmtp:\n  tls: {{certificate: '{cert}', private_key: '{key}'}}\n")
        options = Options()
        options.parseOptions(["--config", config_path])
        config, tls = read_for_reload(options)
        root = build_service(config, MemoryReactorClock(), TOKEN, CollectorRegistry())
        assert root.smtp is not None
        first = root.smtp.tls
        self.assertIsNotNone(first)
        write_certificate(os.path.dirname(cert))  # renewed in place
        with capturedLogs() as events:
            root.reload(*read_for_reload(options))
        self.assertIsNotNone(root.smtp.tls)
        self.assertIsNot(root.smtp.tls, first)
        messages = [formatEvent(e) for e in events]
        self.assertIn("configuration reloaded: rate limits, SMTP certificate applied", messages)
        self.assertFalse([m for m in messages if "need a restart" in m])
        with open(key, "w") as f:
            f.write("not a key")
        with self.assertRaises(UsageError) as caught:
            read_for_reload(options)  # SIGHUP then logs this and changes nothing
        self.assertIn("smtp.tls.certificate", str(caught.exception))

    def test_reload_can_turn_tls_off(self) -> None:
        """Without a certificate in the new configuration STARTTLS stops."""
        cert, key = write_certificate(self.mktemp())
        flags = {"data_dir": self.mktemp(), "smtp.tls.certificate": cert, "smtp.tls.private_key": key}
        root = build_service(load(None, {}, flags), MemoryReactorClock(), TOKEN, CollectorRegistry())
        assert root.smtp is not None
        self.assertIsNotNone(root.smtp.tls)
        root.reload(load(None, {}, {"data_dir": flags["data_dir"]}), None)
        self.assertIsNone(root.smtp.tls)


class FakeSpool:
    def __init__(self, root: str) -> None:
        self.layout = SpoolLayout(root)
        self.done: list[str] = []

    def mark_done(self, message_id: str) -> None:
        self.done.append(message_id)


class FakeDelivery:
    def __init__(self, error: Exception | None = None) -> None:
        self.submitted: list[dict[str, Any]] = []
        self.error = error

    def submit_many(self, records: list[dict[str, Any]]) -> Any:
        self.submitted += records
        return fail(self.error) if self.error else succeed([["job-1"] for _ in records])


RAW = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: Parsed\r\nMessage-ID: <p1@example.org>\r\n\r\nbody\r\n"
RECORD = {"id": "01JD0000000000000000000001", "subject": None, "message_id": None, "message": None, "delivery": {"state": "accepted"}}


class ProcessorTests(SynchronousTestCase):
    def make(self, delivery: Any) -> tuple[MessageProcessor, FakeSpool]:
        spool = FakeSpool(self.mktemp())
        processor = MessageProcessor(spool, ThreadlessReactor(), ManualThreadPool(auto=True), delivery)  # type: ignore[arg-type]
        return processor, spool

    def read_record(self, spool: FakeSpool) -> dict[str, Any]:
        with open(spool.layout.record_path(RECORD["id"]), "rb") as f:
            result: dict[str, Any] = json.loads(f.read())
        return result

    def test_parses_writes_files_submits_then_marks_done(self) -> None:
        """A stored message is parsed, written with its state, handed to delivery, then marked done."""
        delivery = FakeDelivery()
        processor, spool = self.make(delivery)
        processor.message_stored(dict(RECORD), RAW)
        written = self.read_record(spool)
        self.assertEqual(written["subject"], "Parsed")
        self.assertEqual(written["message_id"], "<p1@example.org>")
        self.assertEqual(written["message"]["text"], "body\r\n")
        self.assertEqual(written["delivery"], {"state": "queued"})
        with open(spool.layout.raw_path(RECORD["id"]), "rb") as f:
            self.assertEqual(f.read(), RAW)
        (submitted,) = delivery.submitted
        self.assertEqual({k: v for k, v in written.items() if k != "message"}, submitted)
        self.assertEqual(spool.done, [RECORD["id"]])
        self.assertEqual((processor.processed, processor.failed, processor.in_flight), (1, 0, 0))

    def test_without_delivery_messages_are_stored_and_raw_is_read_from_disk(self) -> None:
        """With no routes the record says stored; a message without bytes in memory is read from its file."""
        processor, spool = self.make(None)
        os.makedirs(spool.layout.message_dir(RECORD["id"]))
        with open(spool.layout.raw_path(RECORD["id"]), "wb") as f:
            f.write(RAW)
        processor.resume([(dict(RECORD), None)])
        self.assertEqual(self.read_record(spool)["delivery"], {"state": "stored"})
        self.assertEqual(self.read_record(spool)["subject"], "Parsed")
        self.assertEqual(spool.done, [RECORD["id"]])

    def test_a_failure_leaves_the_message_to_the_journal(self) -> None:
        """If delivery cannot take the message, it is not marked done (it is replayed at the next start)."""
        processor, spool = self.make(FakeDelivery(OSError("disk")))
        processor.message_stored(dict(RECORD), RAW)
        self.assertEqual(spool.done, [])
        self.assertEqual((processor.failed, processor.processed, processor.in_flight), (1, 0, 0))

    def test_a_missing_raw_file_is_a_failure_not_a_crash(self) -> None:
        """A message whose file vanished fails alone; the processor goes on."""
        processor, spool = self.make(None)
        processor.message_stored(dict(RECORD), None)
        self.assertEqual((processor.failed, spool.done), (1, []))


class TapTests(SynchronousTestCase):
    def test_generated_token_is_strong_private_and_reused(self) -> None:
        """With no token configured one is generated into data_dir/http-token, mode 0600, and kept."""
        config = load(None, {}, {"data_dir": self.mktemp()})
        token, path = ensure_token(config)
        self.assertEqual(path, os.path.abspath(os.path.join(config.data_dir, "http-token")))
        assert path is not None
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertGreaterEqual(len(token), 43)
        self.assertEqual(ensure_token(config), (token, path))

    def test_configured_token_is_used_as_is(self) -> None:
        """A configured token is returned and nothing is written."""
        config = load(None, {"GOMAIL_HTTP__BEARER_TOKEN": TOKEN}, {"data_dir": self.mktemp()})
        self.assertEqual(ensure_token(config), (TOKEN, None))
        self.assertFalse(os.path.exists(config.data_dir))

    def test_flags_map_to_config_keys(self) -> None:
        """twistd flags become key paths; --set takes YAML values; --domain repeats."""
        options = Options()
        options.parseOptions(["--data-dir", "/srv/spool", "--hostname", "mx.test", "--domain", "a.test", "--domain", "b.test", "--set", "smtp.max_recipients=5", "--set", "http.metrics=false"])
        self.assertEqual(
            options.flags(),
            {"data_dir": "/srv/spool", "hostname": "mx.test", "domains": ["a.test", "b.test"], "smtp.max_recipients": 5, "http.metrics": False},
        )
        config = load(None, {}, options.flags())
        self.assertEqual((config.smtp.settings.max_recipients, config.http.metrics, config.domains), (5, False, ("a.test", "b.test")))
