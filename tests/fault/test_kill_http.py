"""Fault: SIGKILL right after HTTP 202s loses nothing."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.daemon import Daemon, wait_until


class KillAfterAcceptTests(SynchronousTestCase):
    def test_sigkill_after_202_then_restart_finds_every_message(self) -> None:
        """Every message answered 202 is intact after kill -9 and a restart, and is processed."""
        daemon = Daemon(self.mktemp())
        self.addCleanup(daemon.kill)
        daemon.start()
        accepted: dict[str, bytes] = {}
        for i in range(30):
            raw = f"From: a@example.org\r\nTo: someone@example.com\r\nSubject: n{i}\r\n\r\nbody {i}\r\n".encode()
            status, doc = daemon.post_message(raw)
            self.assertEqual(status, 202)
            accepted[doc["id"]] = raw
        daemon.kill()
        daemon.start()
        wait_until(lambda: set(accepted) <= set(daemon.message_files()))
        for message_id, raw in accepted.items():
            self.assertEqual(daemon.read_raw(message_id), raw)
            self.assertEqual(daemon.read_record(message_id)["id"], message_id)
        self.assertEqual(daemon.stop(), 0)
        for message_id in accepted:
            self.assertEqual(daemon.read_record(message_id)["delivery"]["state"], "stored")
