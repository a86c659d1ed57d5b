"""Integration: the delivery service against a real twisted.web receiver on loopback."""

from __future__ import annotations

import random
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from gomail.delivery.client import make_http_client
from gomail.delivery.jobs import JobStore, job_id
from gomail.delivery.router import Router
from gomail.delivery.service import DeliveryService
from gomail.delivery.settings import DeliverySettings, RouteSettings
from gomail.delivery.testing import MessageSource, sample_record, temp_dir

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MESSAGES = 30
FAILURES = 3
RAW = b"From: Alice <alice@example.org>\r\nTo: app@example.com\r\nSubject: Hello\r\n\r\nHi there\r\n"


class FlakyReceiver(Resource):
    """Fails the first FAILURES calls (503), answers the next with 429 Retry-After: 1, then accepts."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []
        self.bad_signatures = 0

    def render_POST(self, request: Request) -> bytes:
        body = request.content.read()
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        try:
            Webhook(SECRET).verify(body, headers)
        except WebhookVerificationError:
            self.bad_signatures += 1
        n = len(self.calls) + 1
        status = 503 if n <= FAILURES else 429 if n == FAILURES + 1 else 200
        self.calls.append({"at": reactor.seconds(), "status": status, "headers": headers})
        request.setResponseCode(status)
        if status == 429:
            request.setHeader(b"Retry-After", b"1")
        return b'{"ok": true}' if status == 200 else b"try again"


class CountingChannel(HTTPChannel):
    """Counts TCP connections and notices when all are closed."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.setTcpNoDelay(True)
        self.site.connections += 1
        self.site.open += 1

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.site.open -= 1


class CountingSite(Site):
    protocol = CountingChannel
    connections = 0
    open = 0


async def wait_for(predicate: Any, limit: float) -> None:
    """Poll predicate on the reactor until true, or fail after limit seconds."""
    deadline = reactor.seconds() + limit
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.02, lambda: None)


class ReceiverTests(TestCase):
    """Retries, signatures, webhook ids and connection reuse against a real HTTP server."""

    timeout = 30

    def test_flaky_receiver_gets_everything_signed_over_few_connections(self) -> None:
        """Every message arrives signed, with one webhook-id per job across attempts, over few connections."""
        return Deferred.fromCoroutine(self._exercise())

    async def _exercise(self) -> None:
        receiver = FlakyReceiver()
        site = CountingSite(receiver)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        threads = ThreadPool(1, 2, name="test-delivery")
        threads.start()
        self.addCleanup(threads.stop)

        settings = DeliverySettings(first_retry=0.2, max_backoff=0.5, scan_interval=0.1, concurrency=8, max_persistent_per_host=4)
        route = RouteSettings(
            name="app",
            match=("*@example.com",),
            url=f"http://127.0.0.1:{port.getHost().port}/hook",
            secrets=(SECRET,),
            concurrency=4,
            timeout=5,
        )
        client, pool = make_http_client(reactor, settings)
        messages = MessageSource()
        done: list[str] = []
        service = DeliveryService(
            settings,
            Router(("example.com",), (route,)),
            JobStore(temp_dir(self), fsync=False),
            client,
            reactor,
            threads,
            messages.load,
            rng=random.Random(1),
            pool=pool,
            on_message_done=done.append,
        )
        await service.startService()
        ids = [f"01JDINTEGRATION{i:011d}" for i in range(MESSAGES)]
        for message_id in ids:
            record = messages.add(sample_record(message_id), RAW)
            await service.submit(record)

        await wait_for(lambda: len(done) == MESSAGES, 20)
        await service.stopService()
        await wait_for(lambda: site.open == 0, 5)

        calls = receiver.calls
        self.assertEqual(sorted(done), ids)
        self.assertEqual(receiver.bad_signatures, 0)
        self.assertEqual(len(calls), MESSAGES + FAILURES + 1)
        self.assertEqual({c["headers"]["x-gomail-message-id"] for c in calls if c["status"] == 200}, set(ids))
        for call in calls:
            self.assertEqual(call["headers"]["webhook-id"], job_id(call["headers"]["x-gomail-message-id"], "app"))
        retried = [c["headers"]["webhook-id"] for c in calls if c["status"] != 200]
        for webhook_id in retried:
            attempts = [c["headers"]["x-gomail-attempt"] for c in calls if c["headers"]["webhook-id"] == webhook_id]
            self.assertEqual(attempts, [str(n) for n in range(1, len(attempts) + 1)])
        [limited] = [c for c in calls if c["status"] == 429]
        [after] = [c for c in calls if c["headers"]["webhook-id"] == limited["headers"]["webhook-id"] and c["at"] > limited["at"]]
        self.assertGreaterEqual(after["at"] - limited["at"], 1.0)
        self.assertLessEqual(site.connections, 2 * route.concurrency)
        self.assertGreaterEqual(len(calls), 4 * site.connections)
