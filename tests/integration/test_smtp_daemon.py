"""End-to-end: the real daemon over SMTP with real clients (smtplib, swaks, smtp-source)."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import threading
from email.message import EmailMessage

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.daemon import Daemon, tool, wait_until

RAW = b"From: Alice <alice@example.org>\r\nTo: someone@example.com\r\nSubject: over smtp\r\n\r\nHello over SMTP\r\n"


class SMTPDaemonTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon = Daemon(self.mktemp())
        self.addCleanup(self.daemon.kill)
        self.daemon.start()

    def client(self) -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", self.daemon.smtp_port, local_hostname="client.test", timeout=30)
        self.addCleanup(lambda: _quit(smtp))
        return smtp

    def stored_id(self, reply: bytes) -> str:
        text = reply.decode()
        self.assertTrue(text.startswith("2.0.0 Ok: queued as "), text)
        return text.rsplit(" ", 1)[1]

    def test_smtplib_plain_message_is_stored_with_its_envelope(self) -> None:
        """smtplib delivers; the 250 names the id; the record has the SMTP envelope."""
        smtp = self.client()
        code, _ = smtp.ehlo()
        self.assertEqual(code, 250)
        for ext in ("pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes", "chunking"):
            self.assertTrue(smtp.has_extn(ext), ext)
        smtp.mail("alice@example.org")
        smtp.rcpt("someone@example.com")
        code, reply = smtp.data(RAW)
        self.assertEqual(code, 250)
        message_id = self.stored_id(reply)
        record = wait_until(lambda: message_id in self.daemon.message_files() and self.daemon.read_record(message_id))
        self.assertEqual(record["transport"], "smtp")
        self.assertEqual(record["envelope"]["mail_from"], "alice@example.org")
        self.assertEqual(record["envelope"]["rcpt_to"], ["someone@example.com"])
        self.assertEqual(record["envelope"]["helo"], "client.test")
        self.assertEqual(record["envelope"]["client"]["address"], "127.0.0.1")
        self.assertEqual(record["subject"], "over smtp")
        raw = self.daemon.read_raw(message_id)
        self.assertTrue(raw.startswith(b"Received: from client.test"), raw[:200])
        self.assertTrue(raw.endswith(RAW))

    def test_half_closing_client_gets_every_reply(self) -> None:
        """A pipelining client that shuts down its sending side after QUIT
        still reads its 250 and 221 (the commit finishes after the EOF)."""
        with socket.create_connection(("127.0.0.1", self.daemon.smtp_port), timeout=30) as s:
            s.sendall(
                b"EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<someone@example.com>\r\nDATA\r\n"
                + RAW
                + b".\r\nQUIT\r\n"
            )
            s.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := s.recv(65536):
                received += chunk
        replies = received.decode().splitlines()
        self.assertRegex(replies[-2], r"^250 2\.0\.0 Ok: queued as [0-9A-Z]{26}$")
        self.assertEqual(replies[-1], "221 2.0.0 Bye")
        message_id = replies[-2].rsplit(" ", 1)[1]
        wait_until(lambda: message_id in self.daemon.message_files())

    def test_multiple_recipients_and_a_foreign_one_refused(self) -> None:
        """Two local recipients are accepted; a foreign domain gets 550 5.7.1 (no relay)."""
        smtp = self.client()
        refused = smtp.sendmail("alice@example.org", ["a@example.com", "b@example.com", "x@elsewhere.net"], RAW)
        self.assertEqual(list(refused), ["x@elsewhere.net"])
        code, text = refused["x@elsewhere.net"]
        self.assertEqual(code, 550)
        self.assertTrue(text.startswith(b"5.7.1"), text)

    def test_smtputf8_address(self) -> None:
        """A UTF-8 recipient is accepted when the client asks for SMTPUTF8."""
        smtp = self.client()
        msg = EmailMessage()
        msg["From"] = "alice@example.org"
        msg["To"] = "jürgen@example.com"
        msg["Subject"] = "grüße"
        msg.set_content("hallo")
        self.assertEqual(smtp.send_message(msg), {})  # smtplib adds SMTPUTF8 itself

    def test_twenty_mib_message_keeps_memory_flat(self) -> None:
        """A 20 MiB message is stored exactly while the daemon's RSS stays within a few MiB of idle."""
        idle = self.daemon.rss_kib()
        peak = [idle]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                peak[0] = max(peak[0], self.daemon.rss_kib())

        sampler = threading.Thread(target=sample)
        sampler.start()
        line = b"A" * 76 + b"\r\n"
        body = line * (20 * 1024 * 1024 // len(line))
        raw = b"From: big@example.org\r\nTo: someone@example.com\r\nSubject: big\r\nContent-Type: application/octet-stream\r\n\r\n" + body
        try:
            smtp = self.client()
            smtp.sendmail("big@example.org", ["someone@example.com"], raw)
        finally:
            done.set()
            sampler.join()
        growth_mib = (peak[0] - idle) / 1024
        self.assertLess(growth_mib, 8, f"RSS grew by {growth_mib:.1f} MiB receiving 20 MiB")
        ids = wait_until(lambda: list(self.daemon.message_files()), timeout=60)
        stored = self.daemon.read_raw(ids[0])
        self.assertTrue(stored.endswith(raw))

    def test_swaks(self) -> None:
        """swaks delivers to a configured domain and is refused 550 5.7.1 for a foreign one."""
        swaks = tool("swaks")
        if not swaks:
            self.skipTest("swaks is not installed")
        ok = subprocess.run([swaks, "--server", f"127.0.0.1:{self.daemon.smtp_port}", "--to", "someone@example.com", "--from", "swaks@example.org", "--helo", "swaks.test"], capture_output=True, text=True, timeout=60)
        self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
        self.assertIn("250 2.0.0 Ok: queued as ", ok.stdout)
        wait_until(lambda: len(self.daemon.message_files()) == 1)
        foreign = subprocess.run([swaks, "--server", f"127.0.0.1:{self.daemon.smtp_port}", "--to", "someone@elsewhere.net", "--from", "swaks@example.org"], capture_output=True, text=True, timeout=60)
        self.assertNotEqual(foreign.returncode, 0)
        self.assertIn("550 5.7.1", foreign.stdout)

    def test_smtp_source_thousands_of_messages_all_stored(self) -> None:
        """Postfix's smtp-source sends 2,000 messages over 10 sessions; every one is in the spool."""
        source = tool("smtp-source")
        if not source:
            self.skipTest("smtp-source (Debian package postfix) is not installed")
        count = 2000
        run = subprocess.run(
            [source, "-s", "10", "-m", str(count), "-l", "1024", "-f", "load@example.org", "-t", "someone@example.com", "-M", "mx.test", f"127.0.0.1:{self.daemon.smtp_port}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        wait_until(lambda: len(self.daemon.message_files()) >= count, timeout=180, interval=0.5)
        self.assertEqual(len(self.daemon.message_files()), count)
        self.assertEqual(self.daemon.stop(), 0)


def _quit(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        pass
