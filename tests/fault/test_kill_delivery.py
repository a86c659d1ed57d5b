"""Fault: SIGKILL while webhook deliveries are in flight; after a restart every message is delivered."""

from __future__ import annotations

from collections import defaultdict

from twisted.trial.unittest import SynchronousTestCase

from gomail.delivery.jobs import job_id
from tests.fault.receiver import Receiver
from tests.integration.daemon import TOKEN, Daemon, wait_until

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MESSAGES = 40
CONCURRENCY = 4
SEEN_BEFORE_KILL = 8


def route_config(url: str) -> str:
    return (
        "routes:\n"
        "  - name: app\n"
        "    match: ['*@example.com']\n"
        f"    url: {url}\n"
        f"    secrets: ['{SECRET}']\n"
        "    timeout: 10\n"
        f"    concurrency: {CONCURRENCY}\n"
        "delivery: {first_retry: 1, max_backoff: 2}\n"
    )


class KillDuringDeliveryTests(SynchronousTestCase):
    def test_sigkill_with_deliveries_in_flight_then_restart_delivers_everything(self) -> None:
        """Calls cut by kill -9 are sent again after restart with the same webhook-id; every message arrives signed."""
        receiver = Receiver(SECRET, delay=0.2)
        receiver.start()
        self.addCleanup(receiver.stop)
        daemon = Daemon(self.mktemp(), config=route_config(receiver.url))
        self.addCleanup(daemon.kill)
        daemon.start()

        accepted: list[str] = []
        for i in range(MESSAGES):
            raw = f"From: a@example.org\r\nTo: app@example.com\r\nSubject: n{i}\r\n\r\nbody {i}\r\n".encode()
            status, doc = daemon.post_message(raw, "app@example.com")
            self.assertEqual(status, 202)
            accepted.append(doc["id"])
        self.assertEqual(len(set(accepted)), MESSAGES)

        # Let some deliveries complete, then keep the next ones in flight (received, never answered).
        wait_until(lambda: len(receiver.snapshot()) >= SEEN_BEFORE_KILL, 20)
        receiver.hold()
        wait_until(lambda: receiver.held >= CONCURRENCY, 10)
        daemon.kill()
        before = receiver.snapshot()
        receiver.release()
        held = {c.message_id for c in before if not c.answered}
        self.assertEqual(len(held), CONCURRENCY)
        self.assertLess(len({c.message_id for c in before}), MESSAGES)

        daemon.start()
        wait_until(lambda: receiver.delivered() >= set(accepted), 60)

        def queue_empty() -> bool:
            status, _, doc = daemon.request("GET", "/queue", headers={"Authorization": f"Bearer {TOKEN}"})
            return status == 200 and doc["count"] == 0

        wait_until(queue_empty, 20)
        self.assertEqual(daemon.stop(), 0)

        calls = receiver.snapshot()
        self.assertEqual({c.message_id for c in calls}, set(accepted))
        self.assertEqual([c.message_id for c in calls if not c.signature_ok], [])
        webhook_ids: dict[str, set[str]] = defaultdict(set)
        counts: dict[str, int] = defaultdict(int)
        for call in calls:
            webhook_ids[call.message_id].add(call.webhook_id)
            counts[call.message_id] += 1
            self.assertEqual(call.payload["id"], call.message_id)
            self.assertEqual(call.payload["type"], "message.received")
        for message_id in accepted:
            self.assertEqual(webhook_ids[message_id], {job_id(message_id, "app")})
        repeated = {m for m, n in counts.items() if n > 1}
        self.assertTrue(held <= repeated, (held, repeated))
        for message_id in held:
            self.assertTrue(any(c.answered for c in calls if c.message_id == message_id))
