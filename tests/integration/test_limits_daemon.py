"""End-to-end: the shared rate limiter in the real daemon (HTTP token bucket, SMTP concurrency per client)."""

from __future__ import annotations

import http.client
import json
import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.daemon import TOKEN, Daemon, wait_until

RAW = b"From: a@example.org\r\nTo: someone@example.com\r\nSubject: limits\r\n\r\nhello\r\n"
INGEST_HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "message/rfc822", "X-Original-Recipient": "someone@example.com"}


class HTTPLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon = Daemon(self.mktemp(), config="rate_limit: {trusted_proxies: ['127.0.0.1/32']}\n", limit_loopback=True)
        self.addCleanup(self.daemon.kill)
        self.daemon.start()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.daemon.http_port, timeout=10)
        self.addCleanup(self.conn.close)

    def post(self, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        self.conn.request("POST", "/mail/inbound", RAW, {**INGEST_HEADERS, **(headers or {})})
        resp = self.conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body

    def test_71_rapid_requests_burst_then_429_while_another_client_is_unaffected(self) -> None:
        """71 rapid POSTs: 10 accepted, then 429 rate_limited with headers; another client and /health still pass."""
        started = time.monotonic()
        answers = [self.post() for _ in range(71)]
        elapsed = time.monotonic() - started
        # One token refills every second (60 a minute): a slow machine may
        # earn one more 202 per second the burst took.
        refilled = int(elapsed)
        for _ in range(20):
            self.conn.request("GET", "/health")
            resp = self.conn.getresponse()
            self.assertEqual((resp.status, json.loads(resp.read())["status"]), (200, "ok"))
        codes = [a[0] for a in answers]
        self.assertEqual(codes[:11], [202] * 10 + [429])
        self.assertEqual(set(codes), {202, 429})
        self.assertLessEqual(codes.count(202), 10 + refilled)
        if not refilled:
            self.assertEqual(codes, [202] * 10 + [429] * 61)
        answers = answers[:10] + [a for a in answers[10:] if a[0] == 429]
        for n, (_, headers, _) in enumerate(answers[:10]):
            self.assertEqual(headers["x-ratelimit-limit"], "10")
            self.assertEqual(headers["x-ratelimit-remaining"], str(9 - n))
        for _, headers, body in answers[10:]:
            self.assertEqual(headers["x-ratelimit-limit"], "10")
            self.assertEqual(headers["x-ratelimit-remaining"], "0")
            self.assertEqual(headers["retry-after"], "1")
            self.assertIn(int(headers["x-ratelimit-reset"]), range(1, 11))
            error = json.loads(body)["error"]
            self.assertEqual(error["category"], "rate_limited")
            self.assertEqual(error["details"], {"retry_after": 1})
        self.assertEqual(len({json.loads(a[2])["id"] for a in answers[:10]}), 10)

        status, headers, body = self.post({"X-Forwarded-For": "198.51.100.9"})
        self.assertEqual(status, 202)
        self.assertEqual(headers["x-ratelimit-remaining"], "9")
        self.assertEqual(json.loads(body)["status"], "accepted")
        status, headers, _ = self.post({"X-Forwarded-For": "203.0.113.7, 198.51.100.9"})
        self.assertEqual((status, headers["x-ratelimit-remaining"]), (202, "8"))


class SMTPConcurrencyTests(SynchronousTestCase):
    def test_third_simultaneous_session_gets_421_at_connect(self) -> None:
        """With smtp_concurrent_per_client 2, a third session from the same address gets 421 4.7.0 and is closed."""
        daemon = Daemon(self.mktemp(), config="rate_limit: {smtp_concurrent_per_client: 2}\n", limit_loopback=True)
        self.addCleanup(daemon.kill)
        daemon.start()

        def connect() -> tuple[socket.socket, bytes]:
            s = socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=10)
            self.addCleanup(s.close)
            return s, recv_line(s)

        first, greeting1 = connect()
        second, greeting2 = connect()
        self.assertTrue(greeting1.startswith(b"220 "), greeting1)
        self.assertTrue(greeting2.startswith(b"220 "), greeting2)
        third, refusal = connect()
        self.assertTrue(refusal.startswith(b"421 4.7.0 "), refusal)
        self.assertEqual(third.recv(100), b"")

        first.sendall(b"QUIT\r\n")
        self.assertTrue(recv_line(first).startswith(b"221 "))
        self.assertEqual(first.recv(100), b"")
        deadline = time.monotonic() + 5
        while True:  # the server notices the closed session a moment later
            fourth, greeting4 = connect()
            if greeting4.startswith(b"220 ") or time.monotonic() > deadline:
                break
            fourth.close()
        self.assertTrue(greeting4.startswith(b"220 "), greeting4)
        second.sendall(b"NOOP\r\n")
        self.assertTrue(recv_line(second).startswith(b"250 "))


def recv_line(s: socket.socket) -> bytes:
    """One CRLF-terminated line (or whatever came before EOF)."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data


class ReloadTests(SynchronousTestCase):
    def test_sighup_applies_new_limits_without_a_restart(self) -> None:
        """After the config's burst is raised and SIGHUP sent, the same process allows the larger burst."""
        import signal

        daemon = Daemon(self.mktemp(), config="rate_limit: {per_minute: 1, burst: 2}\n", limit_loopback=True)
        self.addCleanup(daemon.kill)
        daemon.start()
        codes = [daemon.post_message(RAW)[0] for _ in range(3)]
        self.assertEqual(codes, [202, 202, 429])
        daemon.edit_config("rate_limit: {per_minute: 1, burst: 2}", "rate_limit: {per_minute: 600, burst: 50}")
        pid = daemon.proc.pid if daemon.proc else None
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in daemon.log(), timeout=10)
        # The emptied bucket keeps its tokens; at the new rate (10 a second)
        # it refills at once, where the old rate needed a minute a token.
        status, headers, _ = wait_until(lambda: (r := daemon.request("POST", "/mail/inbound", RAW, INGEST_HEADERS))[0] == 202 and r, timeout=5)
        self.assertEqual({k.lower(): v for k, v in headers.items()}["x-ratelimit-limit"], "50")
        self.assertEqual(daemon.proc.pid if daemon.proc else None, pid)
        self.assertEqual(daemon.stop(), 0)


class ProxyProtocolTests(SynchronousTestCase):
    def test_haproxy_endpoint_records_the_real_client(self) -> None:
        """Behind a PROXY-protocol proxy (haproxy: endpoint) the record names the client the proxy reports."""
        daemon = Daemon(self.mktemp())
        daemon.edit_config(f"listen: 'tcp:{daemon.smtp_port}:", f"listen: 'haproxy:tcp:{daemon.smtp_port}:")
        self.addCleanup(daemon.kill)
        daemon.start()
        s = socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=10)
        self.addCleanup(s.close)
        s.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25\r\n")
        self.assertTrue(recv_line(s).startswith(b"220 "))
        for command in (b"EHLO proxied.test", b"MAIL FROM:<a@example.org>", b"RCPT TO:<someone@example.com>", b"DATA"):
            s.sendall(command + b"\r\n")
            line = recv_line(s)
            while line[3:4] == b"-":
                line = recv_line(s)
        self.assertTrue(line.startswith(b"354"), line)
        s.sendall(RAW + b".\r\n")
        reply = recv_line(s)
        self.assertTrue(reply.startswith(b"250 2.0.0 Ok: queued as "), reply)
        message_id = reply.split()[-1].decode()
        record = wait_until(lambda: message_id in daemon.message_files() and daemon.read_record(message_id))
        self.assertEqual(record["connection"]["client_address"], "198.51.100.7")
        self.assertEqual(record["envelope"]["client"]["port"], 40000)
