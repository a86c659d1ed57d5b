"""Fault: graceful shutdown (SIGTERM) of the real daemon with SMTP and HTTP work in flight."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.daemon import TOKEN, Daemon, wait_until

SHUTDOWN_TIMEOUT = 5
SLACK = 2.5
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as (\S+)\r\n$")


def message(n: int) -> tuple[bytes, bytes]:
    """A message in two halves: the first is sent before SIGTERM, the second after."""
    head = f"From: a@example.org\r\nTo: someone@example.com\r\nSubject: drain {n}\r\n\r\nfirst half {n}\r\n".encode()
    tail = f"second half {n}\r\n".encode()
    return head, tail


class Conn:
    """A raw loopback socket that reads CRLF lines with a bound on every wait."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send ``data``; a connection the server already closed shows up on the next read."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _fill(self) -> bool:
        """Read more; False at EOF (a reset counts as EOF)."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return False
        self.buf += data
        return bool(data)

    def line(self) -> bytes:
        """One line including CRLF, or b"" at EOF."""
        while b"\r\n" not in self.buf:
            if not self._fill():
                rest, self.buf = self.buf, b""
                return rest
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def reply(self) -> bytes:
        """A whole SMTP reply (all lines of a multi-line one), or b"" at EOF."""
        out = b""
        while True:
            line = self.line()
            out += line
            if not line or line[3:4] != b"-":
                return out

    def at_eof(self) -> bool:
        """Whether the server closed the connection (nothing more is sent)."""
        return self.buf == b"" and not self._fill()

    def http_response(self) -> tuple[int, dict[str, str], bytes] | None:
        """One HTTP response with a Content-Length body, or None if the connection ended first."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            if not self._fill():
                return None
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body


def smtp_mid_data(port: int, head: bytes) -> Conn:
    """An SMTP session that got 354 and has sent the first part of its message."""
    c = Conn(port)
    assert c.reply().startswith(b"220 "), "no greeting"
    c.send(b"EHLO client.test\r\n")
    assert c.reply().startswith(b"250-"), "EHLO refused"
    for command in (b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<someone@example.com>\r\n"):
        c.send(command)
        reply = c.reply()
        assert reply.startswith(b"250 "), reply
    c.send(b"DATA\r\n")
    reply = c.reply()
    assert reply.startswith(b"354 "), reply
    c.send(head)
    return c


def http_upload_head(length: int) -> bytes:
    return (
        f"POST /mail/inbound HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: message/rfc822\r\nX-Original-Recipient: someone@example.com\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def refused(port: int) -> bool:
    """Whether a new TCP connection to ``port`` is refused."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=1)
    except ConnectionRefusedError:
        return True
    s.close()
    return False


def shutdown_summary(log: str) -> dict[str, int]:
    """The fields of the daemon's "shutdown complete" event (JSON log lines)."""
    for line in log.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if str(event.get("message", "")).startswith("shutdown complete"):
            return {k: event[k] for k in ("sessions_drained", "sessions_cut", "requests_drained", "requests_cut", "deliveries_cut")}
    raise AssertionError("no 'shutdown complete' event in the log")


def upload_counted(daemon: Daemon) -> None:
    """Wait until the server counts the half-sent upload as in flight.

    A /metrics request counts itself, so the upload makes it 2.
    """

    def in_flight() -> float:
        _, _, body = daemon.request("GET", "/metrics")
        match = re.search(rb"^gomail_http_requests_in_flight (\S+)$", body, re.M)
        return float(match.group(1)) if match else 0.0

    wait_until(lambda: in_flight() >= 2, timeout=5)


def poll(predicate: Callable[[], bool], timeout: float) -> bool:
    """Whether ``predicate`` became true within ``timeout`` seconds."""
    try:
        wait_until(predicate, timeout=timeout, interval=0.02)
    except TimeoutError:
        return False
    return True


class GracefulShutdownTests(SynchronousTestCase):
    def start(self) -> Daemon:
        daemon = Daemon(self.mktemp(), config=f"shutdown_timeout: {SHUTDOWN_TIMEOUT}\n")
        self.addCleanup(daemon.kill)
        daemon.start()
        return daemon

    def track(self, conn: Conn) -> Conn:
        self.addCleanup(conn.close)
        return conn

    def test_sigterm_drains_transactions_and_uploads_in_flight(self) -> None:
        """After SIGTERM the ports refuse, work in flight gets a definite answer, every 250/202 is on disk, exit 0."""
        daemon = self.start()
        halves = [message(n) for n in range(3)]
        sessions = [self.track(smtp_mid_data(daemon.smtp_port, head)) for head, _ in halves]
        idle = self.track(Conn(daemon.smtp_port))
        self.assertTrue(idle.reply().startswith(b"220 "))
        idle.send(b"EHLO idle.test\r\n")
        self.assertTrue(idle.reply().startswith(b"250-"))
        upload_head, upload_tail = message(99)
        upload_raw = upload_head + upload_tail
        upload = self.track(Conn(daemon.http_port))
        upload.send(http_upload_head(len(upload_raw)) + upload_head)
        keepalive = self.track(Conn(daemon.http_port))
        keepalive.send(b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = keepalive.http_response()
        assert answer is not None
        self.assertEqual(answer[0], 200)
        upload_counted(daemon)  # the upload's headers and first half are read by the server

        sent = time.monotonic()
        daemon.signal(signal.SIGTERM)
        self.assertTrue(poll(lambda: refused(daemon.smtp_port) and refused(daemon.http_port), 2.0), "ports still accept")

        keepalive.send(b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = keepalive.http_response()
        assert answer is not None
        status, headers, body = answer
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(body)["status"], "not_ready")
        keepalive.send(http_upload_head(len(upload_raw)) + upload_raw)
        answer = keepalive.http_response()
        assert answer is not None
        status, headers, body = answer
        self.assertEqual(status, 503)
        self.assertEqual(headers["retry-after"], "30")
        self.assertEqual(json.loads(body)["error"]["category"], "unavailable")

        idle.send(b"MAIL FROM:<a@example.org>\r\n")
        self.assertTrue(idle.reply().startswith(b"421 4.3.2 "))
        self.assertTrue(idle.at_eof())

        upload.send(upload_tail)
        answer = upload.http_response()
        self.assertIsNotNone(answer, "the upload in flight was cut off without an answer")
        assert answer is not None
        status, headers, body = answer
        accepted: dict[str, bytes] = {}
        self.assertIn(status, (202, 503))
        if status == 202:
            accepted[json.loads(body)["id"]] = upload_raw
        else:
            self.assertEqual(json.loads(body)["error"]["category"], "unavailable")

        for conn, (head, tail) in zip(sessions, halves, strict=True):
            conn.send(tail + b".\r\n")
            reply = conn.reply()
            match = QUEUED.match(reply)
            self.assertIsNotNone(match, reply)
            assert match is not None
            accepted[match.group(1).decode()] = head + tail
        for conn in sessions:
            conn.send(b"MAIL FROM:<b@example.org>\r\n")
            self.assertTrue(conn.reply().startswith(b"421 4.3.2 "))
            self.assertTrue(conn.at_eof())

        assert daemon.proc is not None
        code = daemon.proc.wait(SHUTDOWN_TIMEOUT + SLACK)
        elapsed = time.monotonic() - sent
        self.assertEqual(code, 0)
        self.assertLess(elapsed, SHUTDOWN_TIMEOUT + SLACK)
        self.assertGreaterEqual(len(accepted), 3)
        on_disk = daemon.message_files()
        for message_id, raw in accepted.items():
            self.assertIn(message_id, on_disk)
            self.assertTrue(daemon.read_raw(message_id).endswith(raw))
        summary = shutdown_summary(daemon.log())
        self.assertEqual((summary["sessions_cut"], summary["requests_cut"]), (0, 0))

    def test_http_upload_in_flight_alone_is_answered(self) -> None:
        """An HTTP upload mid-body at SIGTERM (nothing else open) still gets an answer when its body completes."""
        daemon = self.start()
        head, tail = message(7)
        raw = head + tail
        upload = self.track(Conn(daemon.http_port))
        upload.send(http_upload_head(len(raw)) + head)
        upload_counted(daemon)
        sent = time.monotonic()
        daemon.signal(signal.SIGTERM)
        self.assertTrue(poll(lambda: refused(daemon.http_port), 2.0), "the HTTP port still accepts")
        upload.send(tail)
        answer = upload.http_response()
        self.assertIsNotNone(answer, "the upload in flight was cut off without an answer")
        assert answer is not None
        status, _, body = answer
        self.assertEqual(status, 202)
        message_id = json.loads(body)["id"]
        assert daemon.proc is not None
        self.assertEqual(daemon.proc.wait(SHUTDOWN_TIMEOUT + SLACK), 0)
        self.assertLess(time.monotonic() - sent, SHUTDOWN_TIMEOUT + SLACK)
        self.assertEqual(daemon.read_raw(message_id), raw)

    def test_stalled_client_is_cut_off_at_the_timeout(self) -> None:
        """A client stalled mid-DATA holds the drain only until shutdown_timeout: 421 4.3.2, EOF, exit 0."""
        daemon = self.start()
        head, _ = message(1)
        stalled = self.track(smtp_mid_data(daemon.smtp_port, head))
        stalled.sock.settimeout(SHUTDOWN_TIMEOUT + SLACK + 5)
        sent = time.monotonic()
        daemon.signal(signal.SIGTERM)
        self.assertTrue(poll(lambda: refused(daemon.smtp_port), 2.0), "the SMTP port still accepts")
        reply = stalled.reply()
        cut = time.monotonic() - sent
        self.assertTrue(reply.startswith(b"421 4.3.2 "), reply)
        self.assertTrue(stalled.at_eof())
        assert daemon.proc is not None
        self.assertEqual(daemon.proc.wait(SLACK), 0)
        elapsed = time.monotonic() - sent
        self.assertGreaterEqual(cut, SHUTDOWN_TIMEOUT - 0.5)
        self.assertLess(elapsed, SHUTDOWN_TIMEOUT + SLACK)
        self.assertEqual(daemon.message_files(), {})
        self.assertEqual(shutdown_summary(daemon.log())["sessions_cut"], 1)
