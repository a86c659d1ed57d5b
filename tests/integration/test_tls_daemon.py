"""End-to-end: STARTTLS on the real daemon, with smtplib and swaks, and a
certificate renewed by SIGHUP."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.daemon import Daemon, tool, wait_until
from tests.tls_files import write_certificate

RAW = b"From: Alice <alice@example.org>\r\nTo: someone@example.com\r\nSubject: over tls\r\n\r\nHello over TLS\r\n"


def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # self-signed test certificate
    return context


def tls_daemon(test: SynchronousTestCase, listen: str = "tcp", smtp_settings: str = "") -> tuple[Daemon, str, str]:
    """A started daemon offering STARTTLS with a fresh certificate; (daemon, cert, key)."""
    daemon = Daemon(test.mktemp())
    cert, key = write_certificate(os.path.join(daemon.workdir, "tls"), "mx.test")
    line = f"  listen: 'tcp:{daemon.smtp_port}:interface=127.0.0.1'\n"
    new = line.replace("'tcp:", f"'{listen}:") + f"  tls: {{certificate: '{cert}', private_key: '{key}'}}\n" + smtp_settings
    daemon.edit_config(line, new)
    test.addCleanup(daemon.kill)
    daemon.start()
    return daemon, cert, key


def read_reply(f: Any) -> bytes:
    """One whole reply (the last line of a multi-line one)."""
    line = f.readline()
    while line[3:4] == b"-":
        line = f.readline()
    return bytes(line)


class STARTTLSDaemonTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon, self.cert, self.key = tls_daemon(self)

    def client(self) -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", self.daemon.smtp_port, local_hostname="client.test", timeout=30)
        self.addCleanup(smtp.close)
        return smtp

    def served_certificate(self) -> bytes:
        smtp = self.client()
        smtp.starttls(context=_client_context())
        assert isinstance(smtp.sock, ssl.SSLSocket)
        der = smtp.sock.getpeercert(binary_form=True)
        smtp.quit()
        assert der is not None
        return der

    def test_smtplib_starttls_message_is_stored_as_esmtps(self) -> None:
        """STARTTLS is offered; the message sent after it is recorded with tls and a Received naming the cipher."""
        smtp = self.client()
        smtp.ehlo()
        self.assertTrue(smtp.has_extn("starttls"))
        code, reply = smtp.starttls(context=_client_context())
        self.assertEqual((code, reply), (220, b"2.0.0 Ready to start TLS"))
        smtp.ehlo()
        self.assertFalse(smtp.has_extn("starttls"))
        smtp.mail("alice@example.org")
        smtp.rcpt("someone@example.com")
        code, reply = smtp.data(RAW)
        self.assertEqual(code, 250, reply)
        message_id = reply.decode().rsplit(" ", 1)[1]
        record = wait_until(lambda: message_id in self.daemon.message_files() and self.daemon.read_record(message_id))
        self.assertTrue(record["envelope"]["tls"])
        raw = self.daemon.read_raw(message_id)
        head = raw.split(b"\r\n")[:3]
        self.assertEqual(head[0], b"Received: from client.test (unknown [127.0.0.1])")
        self.assertRegex(head[1].decode(), r"^\t\(using TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)\)$")
        self.assertEqual(head[2], f"\tby mx.test (gomail) with ESMTPS id {message_id}".encode())
        smtp.quit()

    def test_plain_sessions_still_work_and_are_not_tls(self) -> None:
        """STARTTLS is offered, never required (RFC 3207 for a public MX)."""
        smtp = self.client()
        smtp.sendmail("alice@example.org", ["someone@example.com"], RAW)
        smtp.quit()
        record = wait_until(lambda: (files := self.daemon.message_files()) and self.daemon.read_record(next(iter(files))))
        self.assertFalse(record["envelope"]["tls"])

    def test_swaks_tls(self) -> None:
        """swaks --tls delivers over STARTTLS."""
        swaks = tool("swaks")
        if not swaks:
            self.skipTest("swaks is not installed")
        support = subprocess.run([swaks, "--support"], capture_output=True, text=True, timeout=60)
        if "=== TLS supported" not in support.stdout + support.stderr:
            self.skipTest("swaks lacks TLS support (Debian: libnet-ssleay-perl)")
        r = subprocess.run(
            [swaks, "--server", f"127.0.0.1:{self.daemon.smtp_port}", "--tls", "--to", "someone@example.com", "--from", "swaks@example.org", "--helo", "swaks.test"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("<-  220 2.0.0 Ready to start TLS", r.stdout)
        self.assertRegex(r.stdout, r"<~  250 2\.0\.0 Ok: queued as [0-9A-Z]{26}")

    def test_handshake_failure_is_logged_and_the_daemon_goes_on(self) -> None:
        """A client that says STARTTLS and then sends garbage is cut off; the next session works."""
        with socket.create_connection(("127.0.0.1", self.daemon.smtp_port), timeout=30) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO client.test\r\n")
            read_reply(f)
            s.sendall(b"STARTTLS\r\n")
            self.assertEqual(f.readline(), b"220 2.0.0 Ready to start TLS\r\n")
            s.sendall(b"this is not a TLS ClientHello\r\n" * 4)
            answer = f.read()  # returns at the server's close (the socket's timeout bounds it)
            self.assertFalse(answer.startswith(b"220") or answer.startswith(b"250"), answer)
            self.assertLess(len(answer), 100)  # at most a TLS alert
        wait_until(lambda: "TLS handshake failed" in self.daemon.log(), timeout=10)
        self.assertIsNotNone(self.served_certificate())

    def test_sighup_serves_a_renewed_certificate(self) -> None:
        """After the files are replaced and SIGHUP sent, new sessions get the new certificate."""
        before = self.served_certificate()
        write_certificate(os.path.dirname(self.cert), "mx.test")
        self.daemon.signal(signal.SIGHUP)
        wait_until(lambda: "SMTP certificate applied" in self.daemon.log(), timeout=10)
        after = self.served_certificate()
        self.assertNotEqual(before, after)
        with open(self.cert, "rb") as f:
            self.assertEqual(ssl.PEM_cert_to_DER_cert(f.read().decode()), after)
        self.assertEqual(self.daemon.stop(), 0)


class ImplicitTLSDaemonTests(SynchronousTestCase):
    def test_ssl_endpoint_sessions_are_esmtps(self) -> None:
        """A listener that is TLS from the first byte (ssl: endpoint) takes mail over SMTP_SSL, recorded as TLS."""
        daemon = Daemon(self.mktemp())
        cert, key = write_certificate(os.path.join(daemon.workdir, "tls"), "mx.test")
        daemon.edit_config(f"listen: 'tcp:{daemon.smtp_port}:", f"listen: 'ssl:{daemon.smtp_port}:privateKey={key}:certKey={cert}:")
        self.addCleanup(daemon.kill)
        daemon.start()
        smtp = smtplib.SMTP_SSL("127.0.0.1", daemon.smtp_port, local_hostname="client.test", timeout=30, context=_client_context())
        self.addCleanup(smtp.close)
        smtp.ehlo()
        self.assertFalse(smtp.has_extn("starttls"))
        smtp.sendmail("alice@example.org", ["someone@example.com"], RAW)
        smtp.quit()
        message_id = wait_until(lambda: next(iter(daemon.message_files()), None))
        record = wait_until(lambda: daemon.read_record(message_id))
        self.assertTrue(record["envelope"]["tls"])
        self.assertIn(f"with ESMTPS id {message_id}".encode(), daemon.read_raw(message_id).split(b"\r\n\r\n")[0])


class TLSSessionEndDaemonTests(SynchronousTestCase):
    def message_and_quit_over_tls(self, s: socket.socket) -> TLSOverSocket:
        """EHLO and STARTTLS in clear text, then a message and QUIT pipelined over TLS."""
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
        read_reply(f)
        self.assertEqual(f.readline(), b"220 2.0.0 Ready to start TLS\r\n")
        tls = TLSOverSocket(s)
        tls.send(b"EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<someone@example.com>\r\nDATA\r\n")
        while b"354 " not in tls.received and tls.receive():
            pass
        self.assertIn(b"354 ", tls.received)
        tls.send(RAW + b".\r\nQUIT\r\n")
        return tls

    def test_stalled_handshake_is_cut_off_at_the_idle_timeout(self) -> None:
        """A client that says STARTTLS and then nothing loses its connection and its session slot."""
        daemon, _, _ = tls_daemon(self, smtp_settings="  idle_timeout: 2\n")
        with socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=30) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
            read_reply(f)
            self.assertEqual(f.readline(), b"220 2.0.0 Ready to start TLS\r\n")
            began = time.monotonic()
            try:
                self.assertEqual(f.read(), b"")  # closed by the server (the socket's 30 s timeout bounds the wait)
            except ConnectionResetError:
                pass  # aborted: nothing could be said before the handshake
            self.assertLess(time.monotonic() - began, 15)
        wait_until(lambda: "gomail_smtp_sessions_active 0.0" in daemon.request("GET", "/metrics")[2].decode(), timeout=10)

    def test_half_close_after_pipelined_quit_over_tls_gets_every_reply(self) -> None:
        """Over TLS, a client that pipelines the message and QUIT and then sends a
        FIN (no close_notify) still reads its 250 and 221."""
        daemon, _, _ = tls_daemon(self)
        with socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=30) as s:
            tls = self.message_and_quit_over_tls(s)
            s.shutdown(socket.SHUT_WR)  # a FIN without TLS's close_notify
            while tls.receive():
                pass
        replies = tls.received.decode().splitlines()
        self.assertRegex(replies[-2], r"^250 2\.0\.0 Ok: queued as [0-9A-Z]{26}$")
        self.assertEqual(replies[-1], "221 2.0.0 Bye")

    def test_starttls_behind_the_proxy_protocol(self) -> None:
        """Behind a haproxy: endpoint STARTTLS works and the Received header names the cipher."""
        daemon, _, _ = tls_daemon(self, listen="haproxy:tcp")
        with socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=30) as s:
            s.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25\r\n")
            tls = self.message_and_quit_over_tls(s)
            while b"221 " not in tls.received and tls.receive():
                pass
        message_id = next(line for line in tls.received.decode().splitlines() if line.startswith("250 2.0.0 Ok: queued as ")).rsplit(" ", 1)[1]
        wait_until(lambda: message_id in daemon.message_files())
        head = daemon.read_raw(message_id).split(b"\r\n")[:3]
        self.assertEqual(head[0], b"Received: from client.test (unknown [198.51.100.7])")
        self.assertRegex(head[1].decode(), r"^\t\(using TLSv1\.[23] with cipher ")
        self.assertTrue(daemon.read_record(message_id)["envelope"]["tls"])


class TLSOverSocket:
    """A TLS client over an already connected socket, through memory BIOs, so
    that the test decides exactly what reaches the wire (a FIN without close_notify)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = _client_context().wrap_bio(self.incoming, self.outgoing, server_side=False)
        self.received = b""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                self.incoming.write(data)
        self._flush()

    def _flush(self) -> None:
        if pending := self.outgoing.read():
            self.sock.sendall(pending)

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def receive(self) -> bool:
        """Read more; False at the end of the stream (a reset included)."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return False
        if not data:
            return False
        self.incoming.write(data)
        while True:
            try:
                chunk = self.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return True
            if not chunk:
                return True
            self.received += chunk
