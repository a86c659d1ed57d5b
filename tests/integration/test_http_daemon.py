"""End-to-end: the real daemon over HTTP on loopback."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.daemon import TOKEN, Daemon, wait_until

RAW = (
    b"From: Alice <alice@example.org>\r\nTo: someone@example.com\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <e2e-1@example.org>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello from the test\r\n"
)


class HTTPDaemonTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon = Daemon(self.mktemp())
        self.addCleanup(self.daemon.kill)
        self.daemon.start()

    def test_post_stores_record_and_raw_then_parses(self) -> None:
        """A posted message is on disk with its record, then gets its parsed structure."""
        status, doc = self.daemon.post_message(RAW)
        self.assertEqual(status, 202)
        self.assertEqual(doc["status"], "accepted")
        record = wait_until(lambda: doc["id"] in self.daemon.message_files() and self.daemon.read_record(doc["id"]))
        self.assertEqual(self.daemon.read_raw(doc["id"]), RAW)
        self.assertEqual(record["recipient"], "someone@example.com")
        self.assertEqual(record["subject"], "Grüße")
        self.assertEqual(record["message"]["text"].strip(), "Hello from the test")
        self.assertEqual(record["delivery"], {"state": "stored"})

    def test_curl_and_errors(self) -> None:
        """curl gets 202 with the token, 401 without, 403 for a foreign domain."""
        if not shutil.which("curl"):
            self.skipTest("curl is not installed")
        base = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Content-Type: message/rfc822", "--data-binary", "@-"]
        url = self.daemon.url + "/mail/inbound"
        ok = subprocess.run([*base, "-H", f"Authorization: Bearer {TOKEN}", url], input=RAW, capture_output=True, timeout=30)
        self.assertEqual(ok.stdout, b"202")
        anon = subprocess.run([*base, url], input=RAW, capture_output=True, timeout=30)
        self.assertEqual(anon.stdout, b"401")
        foreign = subprocess.run([*base, "-H", f"Authorization: Bearer {TOKEN}", "-H", "X-Original-Recipient: x@other.net", url], input=RAW, capture_output=True, timeout=30)
        self.assertEqual(foreign.stdout, b"403")

    def test_sigterm_exits_zero_and_logs_summary(self) -> None:
        """SIGTERM drains and exits 0 with a shutdown summary in the log."""
        self.assertEqual(self.daemon.stop(), 0)
        self.assertIn("shutdown complete", self.daemon.log())


class DefaultStartTests(SynchronousTestCase):
    def test_no_config_file_uses_defaults_and_generates_a_token(self) -> None:
        """With no config at all, gomail starts, generates a 0600 token file and never prints the token."""
        daemon = Daemon(self.mktemp())
        os.unlink(daemon.config_path)
        daemon.config_path = os.devnull
        daemon.env.update(
            GOMAIL_HTTP__LISTEN=f"tcp:{daemon.http_port}:interface=127.0.0.1",
            GOMAIL_SMTP__LISTEN=f"tcp:{daemon.smtp_port}:interface=127.0.0.1",
        )
        self.addCleanup(daemon.kill)
        daemon.start()
        token_path = os.path.join(daemon.workdir, "var", "gomail", "http-token")
        self.assertEqual(stat.S_IMODE(os.stat(token_path).st_mode), 0o600)
        with open(token_path) as f:
            token = f.read().strip()
        self.assertGreaterEqual(len(token), 40)
        # Log lines are written by a background thread, within 0.2 s.
        wait_until(lambda: token_path in daemon.log(), timeout=10)
        log = daemon.log()
        self.assertNotIn(token, log)
        self.assertIn(token_path, log)
        self.assertIn(f"tcp:{daemon.http_port}:interface=127.0.0.1", log)
        self.assertEqual(daemon.stop(), 0)
