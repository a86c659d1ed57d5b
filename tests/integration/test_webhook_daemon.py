"""End-to-end: mail in over SMTP and HTTP, signed webhooks out to a real receiver."""

from __future__ import annotations

import json
import os
import smtplib
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.daemon import REPO, TOKEN, Daemon, wait_until

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Receiver:
    """A webhook receiver on loopback; answers with ``status`` (changeable)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body, "at": time.time()})
                data = b"{}" if receiver.status < 300 else b'{"error": "nope"}'
                self.send_response(receiver.status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class WebhookDaemonTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.receiver = Receiver()
        self.addCleanup(self.receiver.close)
        self.daemon = Daemon(
            self.mktemp(),
            config=(
                "routes:\n"
                "  - name: app\n"
                "    match: ['*@example.com']\n"
                f"    url: http://127.0.0.1:{self.receiver.port}/hook\n"
                f"    secrets: ['{SECRET}']\n"
                "delivery: {first_retry: 1, max_backoff: 2}\n"
            ),
        )
        self.addCleanup(self.daemon.kill)
        self.daemon.start()

    def verified(self, call: dict[str, Any]) -> dict[str, Any]:
        payload: dict[str, Any] = Webhook(SECRET).verify(call["body"], call["headers"])
        return payload

    def test_smtp_and_http_messages_arrive_signed(self) -> None:
        """A message in over SMTP and one over HTTP each reach the webhook, signed, with the documented payload."""
        raw = b"From: Alice <alice@example.org>\r\nTo: app@example.com\r\nSubject: hook me\r\n\r\nHello webhook\r\n"
        with smtplib.SMTP("127.0.0.1", self.daemon.smtp_port, local_hostname="client.test", timeout=30) as smtp:
            smtp.sendmail("alice@example.org", ["app@example.com"], raw)
        sent_at = time.time()
        status, doc = self.daemon.post_message(raw, recipient="app@example.com")
        self.assertEqual(status, 202)
        wait_until(lambda: len(self.receiver.calls) >= 2, timeout=30)
        payloads = sorted((self.verified(c) for c in self.receiver.calls), key=lambda p: p["envelope"]["transport"])
        self.assertEqual([p["envelope"]["transport"] for p in payloads], ["http", "smtp"])
        http_payload, smtp_payload = payloads
        self.assertEqual(http_payload["id"], doc["id"])
        for payload in payloads:
            self.assertEqual(payload["type"], "message.received")
            self.assertEqual(payload["route"], "app")
            self.assertEqual(payload["envelope"]["rcpt_to"], ["app@example.com"])
            self.assertEqual(payload["message"]["subject"], "hook me")
            self.assertEqual(payload["message"]["from"], [{"address": "alice@example.org", "name": "Alice"}])
        self.assertEqual(smtp_payload["envelope"]["helo"], "client.test")
        self.assertEqual(smtp_payload["envelope"]["mail_from"], "alice@example.org")
        headers = self.receiver.calls[0]["headers"]
        self.assertTrue(headers["user-agent"].startswith("gomail/"))
        self.assertEqual(headers["x-gomail-attempt"], "1")
        self.assertLess(max(c["at"] for c in self.receiver.calls) - sent_at, 5.0)

    def test_dead_letters_are_listed_and_replayed(self) -> None:
        """A 400 dead-letters the job; the CLI lists it; the API replays it once the receiver accepts."""
        self.receiver.status = 400
        status, doc = self.daemon.post_message(b"From: a@example.org\r\nTo: app@example.com\r\nSubject: dead\r\n\r\nx\r\n", recipient="app@example.com")
        self.assertEqual(status, 202)
        auth = {"Authorization": f"Bearer {TOKEN}"}

        def dead_jobs() -> list[dict[str, Any]]:
            _, _, body = self.daemon.request("GET", "/queue?state=dead", headers=auth)
            jobs: list[dict[str, Any]] = body["jobs"]
            return jobs

        (job,) = wait_until(dead_jobs, timeout=30)
        self.assertEqual(job["last_status"], 400)
        env = dict(os.environ, PYTHONPATH=REPO)
        listed = subprocess.run(
            [sys.executable, "-m", "gomail.cli", "queue", "list", "--state", "dead", "--json", "--config", self.daemon.config_path],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertEqual([j["id"] for j in json.loads(listed.stdout)], [job["id"]])
        self.receiver.status = 200
        status, _, body = self.daemon.request("POST", "/queue/dead/retry", b"", headers=auth)
        self.assertEqual((status, body["retried"]), (200, 1))
        wait_until(lambda: self.receiver.calls[-1]["headers"].get("webhook-id") == job["id"] and len(self.receiver.calls) >= 2, timeout=30)
        ids = {c["headers"]["webhook-id"] for c in self.receiver.calls}
        self.assertEqual(ids, {job["id"]})
        wait_until(lambda: dead_jobs() == [], timeout=10)
