"""Tests for gomail.delivery.service: outcomes, retries, signing, concurrency, shutdown."""

from __future__ import annotations

import calendar
import json
import random
import time
from typing import Any

from prometheus_client import CollectorRegistry
from standardwebhooks.webhooks import Webhook
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.http import datetimeToString

import gomail
from gomail.delivery.jobs import DEAD, PENDING, Job, JobStore, job_id
from gomail.delivery.router import Router
from gomail.delivery.service import DeliveryService
from gomail.delivery.settings import DeliverySettings, RouteSettings
from gomail.delivery.testing import HANG, MessageSource, ScriptedReceiver, SynchronousThreadPool, ThreadlessClock, sample_record, temp_dir
from gomail.metrics import GomailMetrics

NOW = float(calendar.timegm((2026, 11, 25, 19, 30, 0)))
RAW = b"From: Alice <alice@example.org>\r\nTo: app@example.com\r\nSubject: Hello\r\n\r\nHi there\r\n"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SEED = 7
APP = RouteSettings(name="app", match=("*@example.com",), url="http://hooks.example.net/inbound", secrets=(SECRET,))
OTHER = RouteSettings(name="other", match=("*@other.example",), url="http://other.example.net/hook")


def jitter(seed: int, ceilings: list[float]) -> list[float]:
    """The delays an independent Random(seed) draws for these ceilings."""
    rng = random.Random(seed)
    return [rng.uniform(0.0, c) for c in ceilings]


class FakeClient:
    """An HTTP client whose requests fail or pass through to a StubTreq."""

    def __init__(self, stub: StubTreq) -> None:
        self.stub = stub
        self.down = False
        self.errors: list[Exception] = []
        self.requests = 0

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.requests += 1
        if self.errors:
            return fail(self.errors.pop(0))
        if self.down:
            return fail(ConnectionRefusedError("Connection refused"))
        return self.stub.request(method, url, **kwargs)


class FakePool:
    """Records closeCachedConnections; has the pool's private connection map."""

    def __init__(self) -> None:
        self.closed = 0
        self._connections = {("http", b"h", 80): [object(), object()]}

    def closeCachedConnections(self) -> Deferred[None]:
        self.closed += 1
        return succeed(None)


class ServiceTestCase(SynchronousTestCase):
    """Builds a service on a Clock, a synchronous thread pool and a StubTreq receiver."""

    def build(
        self,
        routes: tuple[RouteSettings, ...] = (APP,),
        settings: DeliverySettings | None = None,
        receiver: ScriptedReceiver | None = None,
        start: bool = True,
        now: float = NOW,
        store: JobStore | None = None,
        **kwargs: Any,
    ) -> DeliveryService:
        self.clock = ThreadlessClock()
        self.clock.advance(now)
        self.receiver = receiver if receiver is not None else ScriptedReceiver()
        self.client = FakeClient(StubTreq(self.receiver))
        self.messages = MessageSource()
        self.store = store if store is not None else JobStore(temp_dir(self), fsync=False)
        self.registry = CollectorRegistry()
        self.metrics = GomailMetrics(self.registry)
        self.pool = FakePool()
        self.done: list[str] = []
        self.routes = routes
        service = DeliveryService(
            settings or DeliverySettings(),
            Router(("example.com",), routes),
            self.store,
            self.client,
            self.clock,
            SynchronousThreadPool(),
            self.messages.load,
            metrics=self.metrics,
            rng=random.Random(SEED),
            pool=self.pool,  # type: ignore[arg-type]
            on_message_done=self.done.append,
            **kwargs,
        )
        if start:
            self.successResultOf(service.startService())
            self.addCleanup(self.stop, service)
        self.service = service
        return service

    def stop(self, service: DeliveryService) -> None:
        if service.running:
            stopping = service.stopService()
            service.cancel_in_flight()
            self.successResultOf(stopping)

    def submit(self, message_id: str = "01JDTESTMESSAGE0000000000A", rcpt_to: tuple[str, ...] = ("app@example.com",)) -> list[str]:
        record = self.messages.add(sample_record(message_id, rcpt_to), RAW)
        return self.successResultOf(self.service.submit(record))

    def job(self, jid: str) -> Job | None:
        return self.store.get(jid)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


class OutcomeTests(ServiceTestCase):
    """What each kind of answer does to a job."""

    def test_2xx_delivers_and_deletes_the_job(self) -> None:
        """A 2xx answer deletes the job file and counts a delivered request."""
        self.build()
        [jid] = self.submit()
        self.assertEqual(len(self.receiver.requests), 1)
        self.assertIsNone(self.job(jid))
        self.assertEqual(self.service.list_jobs(), [])
        self.assertEqual(self.done, ["01JDTESTMESSAGE0000000000A"])
        self.assertEqual(self.metric("gomail_webhook_requests_total", route="app", outcome="delivered", status_class="2xx"), 1.0)

    def test_headers(self) -> None:
        """The request carries the Standard Webhooks and gomail headers."""
        self.build()
        [jid] = self.submit()
        request = self.receiver.requests[0]
        self.assertEqual(request.method, "POST")
        self.assertEqual(request.path, "/inbound")
        self.assertEqual(request.headers["webhook-id"], jid)
        self.assertEqual(request.headers["webhook-timestamp"], str(int(NOW)))
        self.assertEqual(request.headers["user-agent"], f"gomail/{gomail.__version__}")
        self.assertEqual(request.headers["x-gomail-message-id"], "01JDTESTMESSAGE0000000000A")
        self.assertEqual(request.headers["x-gomail-attempt"], "1")
        self.assertEqual(request.headers["content-type"], "application/json")
        self.assertTrue(request.headers["webhook-signature"].startswith("v1,"))
        self.assertNotIn("cookie", request.headers)

    def test_signature_verifies_with_standardwebhooks(self) -> None:
        """Every configured secret's signature verifies with the standardwebhooks package."""
        raw_secret = "plain shared secret"
        route = RouteSettings(name="app", match=("*@example.com",), url="http://h.example/", secrets=(SECRET, raw_secret))
        self.build(routes=(route,), now=float(int(time.time())))
        self.submit()
        request = self.receiver.requests[0]
        self.assertEqual(len(request.headers["webhook-signature"].split(" ")), 2)
        payload = Webhook(SECRET).verify(request.body, request.headers)
        self.assertEqual(payload["type"], "message.received")
        Webhook(raw_secret.encode("utf-8")).verify(request.body, request.headers)

    def test_no_secret_no_signature(self) -> None:
        """A route without secrets sends no webhook-signature header."""
        self.build(routes=(OTHER,))
        self.submit(rcpt_to=("x@other.example",))
        self.assertNotIn("webhook-signature", self.receiver.requests[0].headers)
        self.assertIn("webhook-id", self.receiver.requests[0].headers)

    def test_408_retries_with_backoff(self) -> None:
        """A 408 keeps the job pending, due after a full-jitter delay of at most first_retry."""
        self.build(receiver=ScriptedReceiver([(408, {}, b"slow")]))
        [jid] = self.submit()
        job = self.job(jid)
        assert job is not None
        [delay] = jitter(SEED, [30.0])
        self.assertEqual((job.state, job.attempts, job.last_status, job.last_error), (PENDING, 1, 408, "slow"))
        self.assertEqual(job.next_due, NOW + delay)
        self.assertEqual(self.metric("gomail_webhook_requests_total", route="app", outcome="retry", status_class="4xx"), 1.0)

    def test_429_retry_after_seconds(self) -> None:
        """A 429 with Retry-After in seconds is retried exactly that much later."""
        self.build(receiver=ScriptedReceiver([(429, {"Retry-After": "120"}, b"")]))
        [jid] = self.submit()
        job = self.job(jid)
        assert job is not None
        self.assertEqual((job.state, job.last_status, job.next_due), (PENDING, 429, NOW + 120))
        self.clock.advance(119)
        self.assertEqual(len(self.receiver.requests), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.receiver.requests), 2)
        self.assertIsNone(self.job(jid))

    def test_429_retry_after_http_date(self) -> None:
        """A 429 with Retry-After as an HTTP date is retried at that date."""
        when = datetimeToString(int(NOW) + 600).decode("ascii")
        self.build(receiver=ScriptedReceiver([(429, {"Retry-After": when}, b"")]))
        [jid] = self.submit()
        job = self.job(jid)
        assert job is not None
        self.assertEqual(job.next_due, NOW + 600)

    def test_503_retries_and_honours_retry_after(self) -> None:
        """A 5xx is retried; Retry-After wins over the backoff."""
        self.build(receiver=ScriptedReceiver([(503, {"Retry-After": "45"}, b"maintenance"), (500, {}, b"oops")]))
        [jid] = self.submit()
        job = self.job(jid)
        assert job is not None
        self.assertEqual((job.last_status, job.last_error, job.next_due), (503, "maintenance", NOW + 45))
        self.clock.advance(45)
        job = self.job(jid)
        assert job is not None
        self.assertEqual((job.attempts, job.last_status, job.last_error), (2, 500, "oops"))
        self.assertEqual(self.metric("gomail_webhook_requests_total", route="app", outcome="retry", status_class="5xx"), 2.0)

    def test_connection_refused_retries(self) -> None:
        """A refused connection is retried with backoff and described in last_error."""
        self.build()
        self.client.down = True
        [jid] = self.submit()
        job = self.job(jid)
        assert job is not None
        [delay] = jitter(SEED, [30.0])
        self.assertEqual((job.state, job.attempts, job.last_status), (PENDING, 1, None))
        self.assertEqual(job.last_error, "ConnectionRefusedError: Connection was refused by other side: Connection refused.")
        self.assertEqual(job.next_due, NOW + delay)
        self.assertEqual(self.metric("gomail_webhook_requests_total", route="app", outcome="retry", status_class="error"), 1.0)

    def test_timeout_on_the_clock(self) -> None:
        """A receiver that never answers is cut off after the route timeout, then retried."""
        route = RouteSettings(name="app", match=("*@example.com",), url="http://h.example/", timeout=5.0)
        self.build(routes=(route,), receiver=ScriptedReceiver([HANG]))
        [jid] = self.submit()
        self.assertEqual(self.service.in_flight, 1)
        self.clock.advance(4.9)
        self.assertEqual(self.service.in_flight, 1)
        self.clock.advance(0.1)
        self.assertEqual(self.service.in_flight, 0)
        job = self.job(jid)
        assert job is not None
        [delay] = jitter(SEED, [30.0])
        self.assertEqual((job.state, job.attempts, job.last_error), (PENDING, 1, "timed out"))
        self.assertEqual(job.next_due, NOW + 5.0 + delay)
        self.assertEqual(self.metric("gomail_webhook_requests_total", route="app", outcome="retry", status_class="timeout"), 1.0)

    def test_410_pauses_the_route(self) -> None:
        """A 410 pauses the route: its jobs stay queued, other routes go on, resume sends them."""
        receiver = ScriptedReceiver([(410, {}, b"gone")])
        self.build(routes=(APP, OTHER), receiver=receiver)
        [first] = self.submit("01JDTESTMESSAGE0000000000A")
        self.assertEqual(self.service.paused_routes, frozenset({"app"}))
        self.assertEqual(self.metric("gomail_route_paused", route="app"), 1.0)
        job = self.job(first)
        assert job is not None
        self.assertEqual((job.state, job.attempts, job.last_status, job.next_due), (PENDING, 1, 410, NOW))
        [second] = self.submit("01JDTESTMESSAGE0000000000B")
        [third] = self.submit("01JDTESTMESSAGE0000000000C", ("x@other.example",))
        self.clock.advance(3600)
        self.assertEqual(len(receiver.requests), 2)
        self.assertIsNone(self.job(third))
        self.assertEqual(self.job(second).state, PENDING)  # type: ignore[union-attr]
        self.service.resume_route("app")
        self.assertEqual(self.metric("gomail_route_paused", route="app"), 0.0)
        self.assertEqual(len(receiver.requests), 4)
        self.assertEqual(self.service.list_jobs(), [])

    def test_400_is_a_dead_letter(self) -> None:
        """Another 4xx makes the job dead at once with the status and the first bytes of the body."""
        body = b"x" * 5000
        self.build(settings=DeliverySettings(response_body_cap=100), receiver=ScriptedReceiver([(400, {}, body)]))
        [jid] = self.submit()
        job = self.job(jid)
        assert job is not None
        self.assertEqual((job.state, job.attempts, job.last_status, job.last_error), (DEAD, 1, 400, "x" * 100))
        self.clock.advance(86400)
        self.assertEqual(len(self.receiver.requests), 1)
        self.assertEqual(self.done, [])
        self.assertEqual(self.metric("gomail_webhook_requests_total", route="app", outcome="dead", status_class="4xx"), 1.0)

    def test_redirect_is_not_followed(self) -> None:
        """A 302 is not followed: no request to Location, the job is retried later."""
        self.build(receiver=ScriptedReceiver([(302, {"Location": "http://evil.example/"}, b"")]))
        [jid] = self.submit()
        self.assertEqual(len(self.receiver.requests), 1)
        job = self.job(jid)
        assert job is not None
        self.assertEqual((job.state, job.last_status), (PENDING, 302))

    def test_stale_pooled_connection_is_retried_at_once(self) -> None:
        """A failure before any response byte is sent again at once, in the same attempt."""
        self.build()
        self.client.errors = [ResponseNeverReceived([])]
        [jid] = self.submit()
        self.assertEqual(self.client.requests, 2)
        self.assertEqual(len(self.receiver.requests), 1)
        self.assertEqual(self.receiver.requests[0].headers["x-gomail-attempt"], "1")
        self.assertIsNone(self.job(jid))

    def test_missing_message_is_a_dead_letter(self) -> None:
        """A job whose message the spool no longer has becomes dead without a request."""
        self.build()
        record = sample_record()
        [jid] = self.successResultOf(self.service.submit(record))
        job = self.job(jid)
        assert job is not None
        self.assertEqual((job.state, job.last_error), (DEAD, "message not found in the spool"))
        self.assertEqual(self.receiver.requests, [])


class RetryScheduleTests(ServiceTestCase):
    """Backoff over many attempts, max_age, and a long outage."""

    def test_backoff_schedule(self) -> None:
        """Successive failures wait full-jitter delays with doubling ceilings up to the cap."""
        settings = DeliverySettings(first_retry=10, max_backoff=100, max_age=10**6)
        self.build(settings=settings, receiver=ScriptedReceiver(default=(503, {}, b"")))
        [jid] = self.submit()
        delays = []
        for _ in range(7):
            job = self.job(jid)
            assert job is not None
            delays.append(job.next_due - self.clock.seconds())
            self.clock.advance(job.next_due - self.clock.seconds())
        expected = jitter(SEED, [10, 20, 40, 80, 100, 100, 100])
        for got, want in zip(delays, expected, strict=True):
            self.assertAlmostEqual(got, want, places=6)
        self.assertEqual(len(self.receiver.requests), 8)

    def test_max_age_makes_a_dead_letter(self) -> None:
        """Retries stop at max_age: the last attempt is at the deadline, then the job is dead."""
        settings = DeliverySettings(first_retry=60, max_backoff=600, max_age=3600)
        self.build(settings=settings, receiver=ScriptedReceiver(default=(503, {}, b"down")))
        [jid] = self.submit()
        self.clock.pump([10] * 400)
        job = self.job(jid)
        assert job is not None
        self.assertEqual(job.state, DEAD)
        self.assertEqual(job.last_error, "max_age exceeded; last error: down")
        self.assertEqual(job.updated_at, NOW + 3600)
        self.assertEqual(job.attempts, len(self.receiver.requests))
        self.clock.advance(86400)
        self.assertEqual(job.attempts, len(self.receiver.requests))

    def test_receiver_down_for_an_hour(self) -> None:
        """With the receiver down for an hour the message arrives once it is up, same webhook-id throughout."""
        self.build()
        self.client.down = True
        [jid] = self.submit()
        self.clock.pump([10] * 360)
        refused = self.client.requests
        self.assertGreater(refused, 3)
        self.client.down = False
        self.clock.pump([10] * 400)
        self.assertIsNone(self.job(jid))
        self.assertEqual(len(self.receiver.requests), 1)
        request = self.receiver.requests[0]
        self.assertEqual(request.headers["webhook-id"], jid)
        self.assertEqual(request.headers["x-gomail-attempt"], str(refused + 1))

    def test_same_webhook_id_on_every_attempt(self) -> None:
        """Every attempt of a job sends the same webhook-id and body, and a growing attempt number."""
        self.build(receiver=ScriptedReceiver([(500, {}, b""), (502, {}, b""), (429, {"Retry-After": "1"}, b"")]))
        [jid] = self.submit()
        self.clock.pump([1] * 400)
        requests = self.receiver.requests
        self.assertEqual(len(requests), 4)
        self.assertEqual({r.headers["webhook-id"] for r in requests}, {jid})
        self.assertEqual(len({r.body for r in requests}), 1)
        self.assertEqual([r.headers["x-gomail-attempt"] for r in requests], ["1", "2", "3", "4"])


class QueueTests(ServiceTestCase):
    """Submission, fan-out, concurrency, restart and shutdown."""

    def test_submit_is_idempotent(self) -> None:
        """Submitting the same record twice stores and sends one job."""
        self.build(receiver=ScriptedReceiver([(503, {}, b"")]))
        first = self.submit()
        second = self.submit()
        self.assertEqual(first, second)
        self.assertEqual(first, [job_id("01JDTESTMESSAGE0000000000A", "app")])
        self.assertEqual(len(self.receiver.requests), 1)
        self.assertEqual(len(self.store.load_all()), 1)

    def test_routes_split_recipients(self) -> None:
        """A message for two routes gives one job per route with that route's recipients."""
        self.build(routes=(APP, OTHER))
        self.submit(rcpt_to=("a@example.com", "b@other.example", "c@example.com", "nobody@nowhere.example"))
        bodies = {json.loads(r.body)["route"]: json.loads(r.body)["envelope"]["rcpt_to"] for r in self.receiver.requests}
        self.assertEqual(bodies, {"app": ["a@example.com", "c@example.com"], "other": ["b@other.example"]})

    def test_fan_out_per_recipient(self) -> None:
        """fan_out: recipient gives one job and one call per recipient, each with its own id."""
        route = RouteSettings(name="app", match=("*@example.com",), url="http://h.example/", fan_out="recipient")
        self.build(routes=(route,))
        ids = self.submit(rcpt_to=("a@example.com", "b@example.com"))
        self.assertEqual(ids, [job_id("01JDTESTMESSAGE0000000000A", "app", r) for r in ("a@example.com", "b@example.com")])
        seen = {r.headers["webhook-id"]: json.loads(r.body)["envelope"]["rcpt_to"] for r in self.receiver.requests}
        self.assertEqual(seen, {ids[0]: ["a@example.com"], ids[1]: ["b@example.com"]})
        self.assertEqual(self.done, ["01JDTESTMESSAGE0000000000A"])

    def test_no_route_no_job(self) -> None:
        """A record whose recipients no route takes gives no job."""
        self.build()
        self.assertEqual(self.submit(rcpt_to=("x@nowhere.example",)), [])

    def test_route_concurrency(self) -> None:
        """At most route.concurrency calls of a route are in flight."""
        route = RouteSettings(name="app", match=("*@example.com",), url="http://h.example/", concurrency=2, timeout=60)
        receiver = ScriptedReceiver(default=HANG)
        self.build(routes=(route,), receiver=receiver)
        for i in range(5):
            self.submit(f"01JDTESTMESSAGE000000000{i:02d}")
        self.assertEqual((self.service.in_flight, len(receiver.requests)), (2, 2))
        self.clock.advance(60)
        self.assertEqual((self.service.in_flight, len(receiver.requests)), (2, 4))

    def test_global_concurrency(self) -> None:
        """At most delivery.concurrency calls are in flight over all routes, shared fairly."""
        hang = ScriptedReceiver(default=HANG)
        self.build(routes=(APP, OTHER), settings=DeliverySettings(concurrency=3), receiver=hang)
        for i in range(4):
            self.submit(f"01JDTESTMESSAGE000000000{i:02d}", ("a@example.com", "b@other.example"))
        routes = sorted(json.loads(r.body)["route"] for r in hang.requests)
        self.assertEqual(self.service.in_flight, 3)
        self.assertIn(routes, (["app", "app", "other"], ["app", "other", "other"]))

    def test_restart_resumes_pending_jobs(self) -> None:
        """A job cut off by shutdown stays pending on disk and is delivered after a restart."""
        receiver = ScriptedReceiver([HANG])
        service = self.build(receiver=receiver)
        [jid] = self.submit()
        stopping = service.stopService()
        self.assertNoResult(stopping)
        self.assertEqual(service.in_flight, 1)
        service.cancel_in_flight()
        self.successResultOf(stopping)
        self.assertEqual(self.pool.closed, 1)
        job = self.job(jid)
        assert job is not None
        self.assertEqual((job.state, job.attempts), (PENDING, 0))

        messages = self.messages
        restarted = self.build(receiver=ScriptedReceiver(), store=JobStore(self.store.directory, fsync=False), start=False)
        self.messages.messages = messages.messages
        self.successResultOf(restarted.startService())
        self.addCleanup(self.stop, restarted)
        self.assertEqual([r.headers["webhook-id"] for r in self.receiver.requests], [jid])
        self.assertIsNone(self.job(jid))

    def test_stop_waits_for_in_flight_calls(self) -> None:
        """stopService fires once in-flight calls finish, then closes the pool."""
        route = RouteSettings(name="app", match=("*@example.com",), url="http://h.example/", timeout=10)
        service = self.build(routes=(route,), receiver=ScriptedReceiver([HANG]))
        self.submit()
        stopping = service.stopService()
        self.assertNoResult(stopping)
        self.assertEqual(self.pool.closed, 0)
        self.clock.advance(10)
        self.successResultOf(stopping)
        self.assertEqual(self.pool.closed, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_submit_while_stopped_is_durable(self) -> None:
        """Jobs submitted while the service is stopped are stored and sent at the next start."""
        service = self.build(start=False)
        [jid] = self.submit()
        self.assertEqual(self.receiver.requests, [])
        self.assertIsNotNone(self.job(jid))
        self.successResultOf(service.startService())
        self.addCleanup(self.stop, service)
        self.assertEqual(len(self.receiver.requests), 1)

    def test_gauges(self) -> None:
        """The scan updates queue, oldest-pending and pool gauges."""
        self.build(routes=(APP, OTHER), receiver=ScriptedReceiver([(503, {}, b""), (400, {}, b"")]))
        self.submit("01JDTESTMESSAGE0000000000A")
        self.submit("01JDTESTMESSAGE0000000000B")
        self.clock.advance(1)
        self.assertEqual(self.metric("gomail_queue_jobs", route="app", state="pending"), 1.0)
        self.assertEqual(self.metric("gomail_queue_jobs", route="app", state="dead"), 1.0)
        self.assertEqual(self.metric("gomail_queue_oldest_pending_age_seconds", route="app"), 1.0)
        self.assertEqual(self.metric("gomail_queue_oldest_pending_age_seconds", route="other"), 0.0)
        self.assertEqual(self.metric("gomail_http_pool_connections", state="idle"), 2.0)
        self.assertEqual(self.metric("gomail_http_pool_connections", state="active"), 0.0)
        self.successResultOf(self.service.purge(job_id("01JDTESTMESSAGE0000000000B", "app")))
        self.clock.advance(1)
        self.assertEqual(self.metric("gomail_queue_jobs", route="app", state="dead"), 0.0)

    def test_ssrf_guard_refuses_private_addresses(self) -> None:
        """With block_private_addresses a URL resolving to a private address is a dead letter, unsent."""
        resolved: list[str] = []

        def resolver(host: str) -> Deferred[list[str]]:
            resolved.append(host)
            return succeed(["93.184.216.34", "10.1.2.3"])

        self.build(settings=DeliverySettings(block_private_addresses=True), resolver=resolver)
        [jid] = self.submit()
        job = self.job(jid)
        assert job is not None
        self.assertEqual((job.state, job.last_error), (DEAD, "refused: the URL's host resolves to a private address"))
        self.assertEqual((resolved, self.receiver.requests), (["hooks.example.net"], []))

    def test_ssrf_guard_allows_public_addresses(self) -> None:
        """With block_private_addresses a URL resolving to public addresses is delivered."""
        self.build(settings=DeliverySettings(block_private_addresses=True), resolver=lambda host: succeed(["93.184.216.34"]))
        [jid] = self.submit()
        self.assertIsNone(self.job(jid))
        self.assertEqual(len(self.receiver.requests), 1)

    def test_ssrf_guard_refuses_loopback_literal(self) -> None:
        """With block_private_addresses a loopback IP literal is refused without resolving."""
        route = RouteSettings(name="app", match=("*@example.com",), url="http://127.0.0.1:8080/hook")
        self.build(routes=(route,), settings=DeliverySettings(block_private_addresses=True))
        [jid] = self.submit()
        self.assertEqual(self.job(jid).last_error, "refused: the URL's address is private")  # type: ignore[union-attr]

    def test_private_addresses_allowed_by_default(self) -> None:
        """Without the guard a loopback webhook is called."""
        route = RouteSettings(name="app", match=("*@example.com",), url="http://127.0.0.1:8080/hook")
        self.build(routes=(route,))
        self.submit()
        self.assertEqual(len(self.receiver.requests), 1)


class FailureTests(ServiceTestCase):
    """Failures that are not the receiver's answer."""

    def test_unreadable_message_is_retried(self) -> None:
        """A spool read error (not NotFound) is retried later, not dead-lettered."""
        self.build()
        self.messages.load = lambda message_id: fail(OSError("disk on fire"))  # type: ignore[method-assign]
        self.service._load_message = self.messages.load
        [jid] = self.successResultOf(self.service.submit(sample_record()))
        job = self.job(jid)
        assert job is not None
        self.assertEqual((job.state, job.attempts, job.last_error), (PENDING, 1, "message could not be read"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_internal_error_is_retried_later(self) -> None:
        """A bug while building the payload is logged and retried after a backoff, not at once."""
        self.build()
        record = sample_record()
        record["authentication"] = {"bad": {1, 2}}
        self.service._load_message = lambda message_id: succeed((record, RAW))
        [jid] = self.successResultOf(self.service.submit(json.loads(json.dumps(sample_record()))))
        job = self.job(jid)
        assert job is not None
        [delay] = jitter(SEED, [30.0])
        self.assertEqual((job.state, job.last_error, job.next_due), (PENDING, "internal error", NOW + delay))
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertEqual(self.receiver.requests, [])

    def test_stalled_body_is_cut_off(self) -> None:
        """A receiver that stalls in the middle of its response body is cut off at the route timeout."""
        route = RouteSettings(name="app", match=("*@example.com",), url="http://h.example/", timeout=5.0)

        def stall(received: Any) -> object:
            received.request.setResponseCode(200)
            received.request.write(b"partial")
            return HANG

        self.build(routes=(route,), receiver=ScriptedReceiver([stall]))
        [jid] = self.submit()
        self.client.stub.flush()
        self.assertEqual(self.service.in_flight, 1)
        self.clock.advance(5)
        self.assertEqual(self.service.in_flight, 0)
        job = self.job(jid)
        assert job is not None
        self.assertEqual((job.state, job.last_error), (PENDING, "timed out"))

    def test_jobs_of_unconfigured_routes_stay_queued(self) -> None:
        """Jobs whose route was removed from the configuration are kept, listed, and not sent."""
        store = JobStore(temp_dir(self), fsync=False)
        [orphan] = store.create(
            [
                Job(
                    id=job_id("01JDTESTMESSAGE0000000000Z", "gone"),
                    message_id="01JDTESTMESSAGE0000000000Z",
                    route="gone",
                    recipients=("a@example.com",),
                )
            ]
        )
        self.build(store=store)
        self.clock.advance(60)
        self.assertEqual(self.service.list_jobs(route="gone"), [orphan])
        self.assertEqual(self.receiver.requests, [])
