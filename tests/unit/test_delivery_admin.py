"""Tests for queue administration: gomail.delivery.admin (CLI) and the service's operator methods."""

from __future__ import annotations

import os

from gomail.delivery import admin
from gomail.delivery.jobs import DEAD, PENDING, JobStore, job_id
from gomail.delivery.settings import DeliverySettings, RouteSettings
from gomail.delivery.testing import HANG, ScriptedReceiver, temp_dir
from gomail.errors import InvalidSyntax, NotFound
from tests.unit.test_delivery_service import APP, NOW, OTHER, ServiceTestCase

A = "01JDTESTMESSAGE0000000000A"
B = "01JDTESTMESSAGE0000000000B"
C = "01JDTESTMESSAGE0000000000C"


class CliAdminTests(ServiceTestCase):
    """The CLI's functions, alone and beside a running service."""

    def dead_jobs(self) -> tuple[str, str, str]:
        """Three dead jobs: A and B on app (B dies an hour later), C on other."""
        self.build(routes=(APP, OTHER), receiver=ScriptedReceiver(default=(400, {}, b"bad")))
        [a] = self.submit(A)
        self.clock.advance(3600)
        [b] = self.submit(B)
        [c] = self.submit(C, ("x@other.example",))
        return a, b, c

    def cli_store(self) -> JobStore:
        """A second JobStore on the same directory, as the CLI process opens it."""
        return JobStore(self.store.directory)

    def test_open_store_layout(self) -> None:
        """The CLI and the daemon use <data_dir>/jobs."""
        data_dir = temp_dir(self)
        self.assertEqual(admin.open_store(data_dir).directory, os.path.join(data_dir, "jobs"))

    def test_list(self) -> None:
        """list_jobs filters by state and route."""
        a, b, c = self.dead_jobs()
        store = self.cli_store()
        self.assertEqual([j.id for j in admin.list_jobs(store)], [a, b, c])
        self.assertEqual([j.id for j in admin.list_jobs(store, state=DEAD, route="app")], [a, b])
        self.assertEqual(admin.list_jobs(store, state=PENDING), [])
        self.assertRaises(InvalidSyntax, admin.list_jobs, store, state="paused")

    def test_describe(self) -> None:
        """describe shows times in ISO 8601 UTC."""
        a, _, _ = self.dead_jobs()
        shown = admin.describe(admin.list_jobs(self.cli_store())[0])
        self.assertEqual((shown["id"], shown["created_at"], shown["state"], shown["last_status"]), (a, "2026-11-25T19:30:00Z", DEAD, 400))

    def test_cli_retry_is_picked_up_by_the_running_service(self) -> None:
        """A CLI retry of a dead job is sent by the running service within one scan interval."""
        a, _, _ = self.dead_jobs()
        self.receiver.default = (200, {}, b"ok")
        job = admin.retry(self.cli_store(), a, now=self.clock.seconds())
        self.assertEqual((job.state, job.next_due), (PENDING, self.clock.seconds()))
        sent = len(self.receiver.requests)
        self.clock.advance(1)
        self.assertEqual(len(self.receiver.requests), sent + 1)
        self.assertEqual(self.receiver.requests[-1].headers["webhook-id"], a)
        self.assertIsNone(self.store.get(a))
        self.assertEqual([j.id for j in self.service.list_jobs(state=DEAD)], [job_id(B, "app"), job_id(C, "other")])

    def test_cli_retry_dead_filters(self) -> None:
        """retry_dead takes only the route's jobs that died since the given time."""
        a, b, c = self.dead_jobs()
        store = self.cli_store()
        self.assertEqual([j.id for j in admin.retry_dead(store, route="app", since=NOW + 1800, now=NOW + 7200)], [b])
        self.assertEqual([j.id for j in admin.retry_dead(store, now=NOW + 7200)], [a, c])
        self.assertEqual(admin.retry_dead(store), [])

    def test_cli_purge_is_picked_up_by_the_running_service(self) -> None:
        """A CLI purge of a pending job makes the running service forget it; it is never sent."""
        self.build(receiver=ScriptedReceiver([(503, {"Retry-After": "600"}, b"")]))
        [a] = self.submit(A)
        self.assertEqual(admin.purge(self.cli_store(), a).id, a)
        self.clock.advance(1)
        self.assertEqual(self.service.list_jobs(), [])
        self.assertEqual(self.done, [A])
        self.clock.advance(3600)
        self.assertEqual(len(self.receiver.requests), 1)
        self.assertRaises(NotFound, admin.purge, self.cli_store(), a)
        self.assertRaises(NotFound, admin.retry, self.cli_store(), a)
        self.assertRaises(InvalidSyntax, admin.retry, self.cli_store(), "../../etc/passwd")

    def test_purge_during_an_attempt_wins(self) -> None:
        """A job purged while its call is in flight is not written back by the failed attempt."""
        route = RouteSettings(name="app", match=("*@example.com",), url="http://h.example/", timeout=5)
        self.build(routes=(route,), receiver=ScriptedReceiver([HANG]))
        [a] = self.submit(A)
        admin.purge(self.cli_store(), a)
        self.clock.advance(5)
        self.assertIsNone(self.store.get(a))
        self.clock.advance(3600)
        self.assertEqual(self.service.list_jobs(), [])
        self.assertEqual(len(self.receiver.requests), 1)

    def test_retry_during_an_attempt_wins(self) -> None:
        """A job retried while its failing call is in flight is due at once afterwards."""
        route = RouteSettings(name="app", match=("*@example.com",), url="http://h.example/", timeout=5)
        self.build(routes=(route,), receiver=ScriptedReceiver([HANG]))
        [a] = self.submit(A)
        admin.retry(self.cli_store(), a, now=NOW + 1)
        self.clock.advance(5)
        self.assertEqual(len(self.receiver.requests), 2)
        self.assertIsNone(self.store.get(a))


class ServiceAdminTests(ServiceTestCase):
    """The service's operator methods (for the HTTP API)."""

    def setUp(self) -> None:
        self.build(
            routes=(APP, OTHER),
            settings=DeliverySettings(),
            receiver=ScriptedReceiver([(400, {}, b""), (400, {}, b""), (400, {}, b"")]),
        )
        self.a = self.submit(A)[0]
        self.clock.advance(3600)
        self.b = self.submit(B)[0]
        self.c = self.submit(C, ("x@other.example",))[0]

    def test_list_jobs(self) -> None:
        """list_jobs filters by state and route and refuses unknown states."""
        self.assertEqual([j.id for j in self.service.list_jobs()], [self.a, self.b, self.c])
        self.assertEqual([j.id for j in self.service.list_jobs(DEAD, "other")], [self.c])
        self.assertRaises(InvalidSyntax, self.service.list_jobs, "delivered")
        self.assertEqual(self.service.get_job(self.a).state, DEAD)
        self.assertRaises(NotFound, self.service.get_job, job_id(A, "nope"))

    def test_retry(self) -> None:
        """retry sends a dead job at once; unknown and malformed ids fail."""
        job = self.successResultOf(self.service.retry(self.a))
        self.assertEqual((job.state, job.requeued_at), (PENDING, NOW + 3600))
        self.assertEqual(self.receiver.requests[-1].headers["webhook-id"], self.a)
        self.assertEqual(self.receiver.requests[-1].headers["x-gomail-attempt"], "2")
        self.assertIsNone(self.store.get(self.a))
        self.failureResultOf(self.service.retry(self.a), NotFound)
        self.failureResultOf(self.service.retry("a/b"), InvalidSyntax)

    def test_retry_dead(self) -> None:
        """retry_dead requeues dead jobs by route and since."""
        self.assertEqual(self.successResultOf(self.service.retry_dead(route="app", since=NOW + 1)), [self.b])
        self.assertEqual(self.successResultOf(self.service.retry_dead()), [self.a, self.c])
        self.assertEqual(self.service.list_jobs(), [])

    def test_purge(self) -> None:
        """purge removes a job and tells the spool when it was the message's last."""
        self.assertEqual(self.successResultOf(self.service.purge(self.a)).id, self.a)
        self.assertEqual(self.done, [A])
        self.assertIsNone(self.store.get(self.a))
        self.failureResultOf(self.service.purge(self.a), NotFound)

    def test_resume_unknown_route(self) -> None:
        """resume_route refuses an unknown route and ignores one that is not paused."""
        self.assertRaises(NotFound, self.service.resume_route, "nope")
        self.service.resume_route("app")
        self.assertEqual(self.service.paused_routes, frozenset())
