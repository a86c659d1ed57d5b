"""The delivery service: sends due jobs to their webhooks and retries failures.

Life of a job:

1. :meth:`DeliveryService.submit` creates one job per (message, route), or per
   recipient with ``fan_out: recipient``, durably in the :class:`JobStore`,
   due now.  Re-submitting the same message finds the same jobs (no-op).
2. When a job is due and its route has a free slot (``route.concurrency``)
   and so does the service (``delivery.concurrency``), the message is loaded,
   the payload built and signed, and POSTed.  The whole exchange, response
   body included, is bounded by ``route.timeout`` on the injected clock.
3. The outcome is written back atomically: a 2xx deletes the job; 408, 429,
   5xx, 3xx (redirects are not followed), connection errors and timeouts set
   the next due time (``Retry-After`` if given, else capped exponential
   backoff with full jitter) until ``max_age`` is over, then the job is dead;
   410 pauses the route (jobs stay pending) until :meth:`resume_route` or a
   restart; any other 4xx makes the job dead at once with the status and the
   first bytes of the body.

The service keeps every pending and dead job in memory (a few hundred bytes
each) and a heap of due times per route; one timer wakes it for the earliest
due job.  A ``LoopingCall`` every ``scan_interval`` updates the queue gauges
and reloads the store when an operator changed it from the CLI
(see :mod:`gomail.delivery.admin`).

Delivery is at-least-once: a job in flight when the process dies is still
pending on disk and is sent again after the restart, with the same
``webhook-id``.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorPluggableNameResolver, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from gomail import __version__
from gomail.delivery.addresses import Resolver, refusal, resolve_host
from gomail.delivery.backoff import parse_retry_after, retry_at
from gomail.delivery.client import idle_connections
from gomail.delivery.jobs import DEAD, PENDING, STATES, Job, JobConflict, JobStore, check_job_id
from gomail.delivery.jobs import job_id as make_job_id
from gomail.delivery.payload import build_payload
from gomail.delivery.router import Router
from gomail.delivery.settings import DeliverySettings, RouteSettings
from gomail.delivery.signing import signature_header
from gomail.errors import InvalidSyntax, NotFound
from gomail.metrics import GomailMetrics

_T = TypeVar("_T")

_STALE_CONNECTION_ERRORS = (ResponseNeverReceived, RequestNotSent, RequestTransmissionFailed)
"""Failures before any response byte: typically a pooled keep-alive
connection the receiver had already closed.  Sent again at once, once."""

USER_AGENT = f"gomail/{__version__}"

MessageLoader = Callable[[str], "Deferred[tuple[dict[str, Any], bytes]]"]
"""Loads a stored message: ``message_id -> (record, raw MIME bytes)``; fails
with ``gomail.errors.NotFound`` when the spool no longer has it."""


class _Interrupted(Exception):
    """An attempt cut off by :meth:`DeliveryService.cancel_in_flight`."""


class _Result:
    """What one attempt came to (internal)."""

    __slots__ = ("outcome", "status_class", "status", "error", "retry_after")

    def __init__(
        self,
        outcome: str,
        status_class: str,
        status: int | None = None,
        error: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.outcome = outcome  # delivered | retry | dead | paused
        self.status_class = status_class  # 2xx..5xx | timeout | error | none
        self.status = status
        self.error = error
        self.retry_after = retry_after


def _timed_out(result: object, timeout: float) -> None:
    """``addTimeout``'s ``onTimeoutCancel``: whatever the cancellation gave, a timeout."""
    raise TimeoutError(timeout, "webhook call")


class _CappedBody(Protocol):
    """Reads a response body to its end, keeping only the first ``cap`` bytes.

    Reading to the end lets the connection go back to the pool.  Cancelling
    ``done`` (the route timeout) drops the connection.
    """

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._kept = bytearray()
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        room = self._cap - len(self._kept)
        if room > 0:
            self._kept.extend(data[:room])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(bytes(self._kept))
        else:
            self.done.errback(reason)

    def _cancel(self, d: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


def _describe(error: BaseException) -> str:
    """A short, URL-free description of a connection-level error."""
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, ResponseNeverReceived):
        reasons = ", ".join(type(r.value).__name__ for r in error.reasons)
        return f"ResponseNeverReceived({reasons})"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:200]


class DeliveryService(Service):
    """Delivers stored messages to their routes' webhooks, durably.

    Args:
        settings: Delivery settings.
        router: The router (recipient -> route; route by name).
        store: The job store.
        client: A treq ``HTTPClient`` (``make_http_client``) or a
            ``StubTreq`` in tests.
        clock: The reactor's time.  It is also the reactor that
            ``deferToThreadPool`` uses, so it must provide
            ``IReactorFromThreads`` (the real reactor does; tests use
            ``gomail.delivery.testing.ThreadlessClock``).
        threadpool: Runs the store's blocking file I/O and payload building
            (a started ``ThreadPool``, or ``SynchronousThreadPool`` in tests).
        load_message: Loads a stored message by id (see :data:`MessageLoader`).
        metrics: Metrics to update, if any.
        rng: Random source for the backoff jitter.
        pool: The client's connection pool, closed by :meth:`stopService`
            and read for the pool gauges.
        resolver: Resolves host names for the SSRF guard; by default the
            clock's ``nameResolver`` when it has one.
        on_message_done: Called with a message id when the last job of that
            message has left the store (delivered or purged); dead jobs keep
            their message, so it can be replayed.  The spool may then forget
            the message.
    """

    _log = Logger()
    name = "delivery"  # type: ignore[assignment]

    def __init__(
        self,
        settings: DeliverySettings,
        router: Router,
        store: JobStore,
        client: Any,
        clock: IReactorTime,
        threadpool: Any,
        load_message: MessageLoader,
        metrics: GomailMetrics | None = None,
        rng: random.Random | None = None,
        pool: HTTPConnectionPool | None = None,
        *,
        resolver: Resolver | None = None,
        on_message_done: Callable[[str], object] | None = None,
    ) -> None:
        self.settings = settings
        self.router = router
        self.store = store
        self._client = client
        self._clock = clock
        self._threadpool = threadpool
        self._load_message = load_message
        self._metrics = metrics
        self._rng = rng if rng is not None else random.Random()
        self._pool = pool
        if resolver is None and IReactorPluggableNameResolver.providedBy(clock):
            name_resolver = clock.nameResolver  # type: ignore[attr-defined]

            def default_resolver(host: str) -> Deferred[Sequence[str]]:
                return resolve_host(name_resolver, host)

            resolver = default_resolver
        self._resolver = resolver
        self._on_message_done = on_message_done

        self._jobs: dict[str, Job] = {}
        self._by_message: dict[str, set[str]] = {}
        self._heaps: dict[str, list[tuple[float, int, str]]] = {r.name: [] for r in router.routes}
        self._order = itertools.count()
        self._route_slots = {r.name: DeferredSemaphore(r.concurrency) for r in router.routes}
        self._slots = DeferredSemaphore(settings.concurrency)
        self._in_flight: dict[str, Deferred[None]] = {}
        self._paused: set[str] = set()
        self._timer: IDelayedCall | None = None
        self._loop: LoopingCall | None = None
        self._loaded = False
        self._stopping = False
        self._cancelling = False
        self._pumping = False
        self._repump = False
        self._changes_token: str | None = None
        self._scanning = False
        self._touched: set[str] = set()
        self._busy = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._gauge_keys: set[tuple[str, str]] = set()

    # -- plumbing ---------------------------------------------------------------

    def _in_thread(self, f: Callable[..., _T], *args: Any, **kwargs: Any) -> Deferred[_T]:
        return deferToThreadPool(self._clock, self._threadpool, f, *args, **kwargs)  # type: ignore[arg-type]

    def _track(self, d: Deferred[_T]) -> Deferred[_T]:
        """Count ``d`` as outstanding work until it fires (stopService waits)."""
        self._busy += 1

        def finished(result: _T) -> _T:
            self._busy -= 1
            if self._busy == 0:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return result

        return d.addBoth(finished)

    def _when_idle(self) -> Deferred[None]:
        if self._busy == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    # -- service life -------------------------------------------------------------

    def startService(self) -> Deferred[None]:
        """Load every job from the store and start sending; fires when loaded."""
        super().startService()
        self._stopping = False
        self._cancelling = False
        return self._track(Deferred.fromCoroutine(self._load()))

    async def _load(self) -> None:
        try:
            self._changes_token = await self._in_thread(self.store.changes)
            removed = await self._in_thread(self.store.recover)
            if removed:
                self._log.info("removed {count} half-written job files", count=removed)
            jobs = await self._in_thread(self.store.load_all)
        except Exception:
            self._log.failure("could not load the delivery queue; will retry at the next scan")
            self._changes_token = None
            jobs = []
        if not self.running:
            return
        unknown: set[str] = set()
        for job in jobs:
            mine = self._jobs.get(job.id)
            if job.id in self._in_flight or (mine is not None and mine.revision >= job.revision):
                continue
            self._adopt(job)
            if job.route not in self._heaps:
                unknown.add(job.route)
        for route in sorted(unknown):
            self._log.warn("jobs for unconfigured route {route} stay queued", route=route)
        self._loaded = True
        pending = sum(1 for j in self._jobs.values() if j.state == PENDING)
        self._log.info(
            "delivery queue loaded: {pending} pending, {dead} dead",
            pending=pending,
            dead=len(self._jobs) - pending,
        )
        loop = self._loop = LoopingCall(self._tick)
        loop.clock = self._clock
        loop.start(self.settings.scan_interval, now=False).addErrback(lambda f: self._log.failure("delivery scan loop died", f))
        self._update_gauges()
        self._pump()

    def stopService(self) -> Deferred[None]:
        """Stop starting sends; fire once in-flight work is done and the pool closed.

        In-flight webhook calls may finish (each is bounded by its route's
        timeout).  The caller bounds the whole wait: after its shutdown
        timeout it calls :meth:`cancel_in_flight`, which cuts the calls off
        (their jobs stay pending on disk and are sent again at the next start).
        """
        super().stopService()
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d = self._when_idle()
        d.addCallback(lambda _: self._close_pool())
        return d

    def _close_pool(self) -> Deferred[None] | None:
        if self._pool is None:
            return None
        return self._pool.closeCachedConnections()

    @property
    def in_flight(self) -> int:
        """Webhook calls in progress now."""
        return len(self._in_flight)

    def cancel_in_flight(self) -> None:
        """Cut off every webhook call in progress (shutdown timeout reached).

        The cut-off jobs are not updated on disk: they stay pending and are
        sent again after the restart (at-least-once).  No new call starts
        afterwards (until the next ``startService``).
        """
        self._stopping = True
        self._cancelling = True
        for d in list(self._in_flight.values()):
            d.cancel()

    # -- the in-memory queue -------------------------------------------------------

    def _adopt(self, job: Job) -> None:
        """Take ``job`` as the current version (and schedule it if pending)."""
        self._jobs[job.id] = job
        self._by_message.setdefault(job.message_id, set()).add(job.id)
        if self._scanning:
            self._touched.add(job.id)
        heap = self._heaps.get(job.route)
        if job.state == PENDING and heap is not None:
            heapq.heappush(heap, (job.next_due, next(self._order), job.id))

    def _forget(self, job_id: str) -> None:
        """Drop a job that left the store; tell the spool when its message is done."""
        job = self._jobs.pop(job_id, None)
        if self._scanning:
            self._touched.add(job_id)
        if job is None:
            return
        siblings = self._by_message.get(job.message_id)
        if siblings is None:
            return
        siblings.discard(job_id)
        if siblings:
            return
        del self._by_message[job.message_id]
        if self._on_message_done is not None:
            try:
                self._on_message_done(job.message_id)
            except Exception:
                self._log.failure("on_message_done failed for {message_id}", message_id=job.message_id)

    def _head(self, route: str, now: float | None) -> Job | None:
        """The earliest valid pending job of ``route`` (popped if due by ``now``)."""
        heap = self._heaps[route]
        while heap:
            due, _, jid = heap[0]
            job = self._jobs.get(jid)
            if job is None or job.state != PENDING or jid in self._in_flight or job.next_due != due:
                heapq.heappop(heap)
                continue
            if now is None:
                return job
            if due > now:
                return None
            heapq.heappop(heap)
            return job
        return None

    def _pump(self) -> None:
        """Start every due job there is a slot for; arm the timer for the next."""
        if self._pumping:
            self._repump = True
            return
        self._pumping = True
        try:
            while True:
                self._repump = False
                self._pump_once()
                if not self._repump:
                    break
        finally:
            self._pumping = False
        self._arm()

    def _pump_once(self) -> None:
        if not self.running or self._stopping or not self._loaded:
            return
        now = self._clock.seconds()
        started = True
        while started and self._slots.tokens > 0:
            started = False
            for route_name in list(self._heaps):
                if self._slots.tokens == 0:
                    break
                if route_name in self._paused or self._route_slots[route_name].tokens == 0:
                    continue
                job = self._head(route_name, now)
                if job is None:
                    continue
                self._launch(job)
                started = True

    def _arm(self) -> None:
        """Set the wake-up timer to the earliest due job that has a free slot."""
        if not self.running or self._stopping or not self._loaded:
            return
        earliest: float | None = None
        if self._slots.tokens > 0:
            for route_name in self._heaps:
                if route_name in self._paused or self._route_slots[route_name].tokens == 0:
                    continue
                job = self._head(route_name, None)
                if job is not None and (earliest is None or job.next_due < earliest):
                    earliest = job.next_due
        if self._timer is not None and self._timer.active():
            if earliest is not None and self._timer.getTime() == earliest:
                return
            self._timer.cancel()
        self._timer = None
        if earliest is not None:
            delay = max(0.0, earliest - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._pump()

    def _launch(self, job: Job) -> None:
        route = self.router.route_named(job.route)
        assert route is not None
        self._route_slots[route.name].acquire()
        self._slots.acquire()
        d = Deferred.fromCoroutine(self._attempt(job, route))
        if d.called:
            # It finished synchronously (synchronous I/O in tests); the
            # pump that called us carries on.
            self._finished(job.id, route.name)
            return
        self._in_flight[job.id] = d
        self._track(d)

        def finished(_: None) -> None:
            self._finished(job.id, route.name)
            self._pump()

        d.addCallback(finished)

    def _finished(self, job_id: str, route_name: str) -> None:
        """Free the attempt's slots; make sure its job is on the heap if pending."""
        self._in_flight.pop(job_id, None)
        self._route_slots[route_name].release()
        self._slots.release()
        job = self._jobs.get(job_id)
        heap = self._heaps.get(job.route) if job is not None else None
        if job is not None and job.state == PENDING and heap is not None:
            heapq.heappush(heap, (job.next_due, next(self._order), job.id))

    # -- one attempt ----------------------------------------------------------------

    async def _attempt(self, job: Job, route: RouteSettings) -> None:
        """Send ``job`` once and record the outcome; never raises."""
        try:
            await self._deliver(job, route)
            return
        except (_Interrupted, CancelledError):
            self._log.info("delivery of {job_id} cut off by shutdown", job_id=job.id)
            return
        except Exception:
            if self._cancelling:
                return
            self._log.failure("delivery of {job_id} failed unexpectedly", job_id=job.id)
        # A bug: retry later rather than at once, so it cannot spin.
        try:
            await self._record(job, route, _Result("retry", "none", error="internal error"), job.attempts + 1)
        except Exception:
            self._log.failure("could not record the failure of {job_id}", job_id=job.id)

    async def _deliver(self, job: Job, route: RouteSettings) -> None:
        attempt = job.attempts + 1
        try:
            record, raw = await self._load_message(job.message_id)
        except NotFound:
            await self._record(job, route, _Result("dead", "none", error="message not found in the spool"), attempt)
            return
        except Exception as e:
            if self._cancelling:
                raise _Interrupted() from e
            self._log.failure("could not load message {message_id}", message_id=job.message_id)
            await self._record(job, route, _Result("retry", "none", error="message could not be read"), attempt)
            return

        body, content_type = await self._in_thread(build_payload, record, raw, route, job.recipients, job.id)
        del record, raw

        if self.settings.block_private_addresses:
            try:
                reason = await refusal(route.url, self._resolver)
            except Exception as e:
                if self._cancelling:
                    raise _Interrupted() from e
                await self._record(job, route, _Result("retry", "error", error=_describe(e)), attempt)
                return
            if reason is not None:
                self._log.error(
                    "route {route}: webhook refused by block_private_addresses: {reason}",
                    route=route.name,
                    reason=reason,
                )
                await self._record(job, route, _Result("dead", "none", error=f"refused: {reason}"), attempt)
                return

        started = self._clock.seconds()
        result = await self._call(job, route, body, content_type, attempt)
        if self._metrics is not None:
            self._metrics.webhook_duration.labels(route=route.name).observe(max(0.0, self._clock.seconds() - started))
        await self._record(job, route, result, attempt)

    async def _call(self, job: Job, route: RouteSettings, body: bytes, content_type: str, attempt: int) -> _Result:
        """POST the payload; classify what came back."""
        for try_number in (1, 2):
            timestamp = int(self._clock.seconds())
            headers = Headers(
                {
                    b"Content-Type": [content_type.encode("ascii")],
                    b"User-Agent": [USER_AGENT.encode("ascii")],
                    b"webhook-id": [job.id.encode("ascii")],
                    b"webhook-timestamp": [str(timestamp).encode("ascii")],
                    b"X-Gomail-Message-Id": [job.message_id.encode("ascii")],
                    b"X-Gomail-Attempt": [str(attempt).encode("ascii")],
                }
            )
            if route.secrets:
                signature = signature_header(route.secrets, job.id, timestamp, body)
                headers.setRawHeaders(b"webhook-signature", [signature.encode("ascii")])
            exchange = Deferred.fromCoroutine(self._exchange(route, headers, body))
            exchange.addTimeout(route.timeout, self._clock, onTimeoutCancel=_timed_out)
            try:
                status, retry_after_header, snippet = await exchange
            except TimeoutError as e:
                if self._cancelling:
                    raise _Interrupted() from e
                return _Result("retry", "timeout", error="timed out")
            except Exception as e:
                if self._cancelling:
                    raise _Interrupted() from e
                if try_number == 1 and isinstance(e, _STALE_CONNECTION_ERRORS):
                    # Most often a pooled keep-alive connection the receiver
                    # had closed: send again at once on a fresh connection.
                    continue
                return _Result("retry", "error", error=_describe(e))
            return self._classify(status, retry_after_header, snippet)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _exchange(self, route: RouteSettings, headers: Headers, body: bytes) -> tuple[int, bytes | None, bytes]:
        """One request and its response body (first ``response_body_cap`` bytes kept)."""
        response = await self._client.request(
            "POST",
            route.url,
            data=body,
            headers=headers,
            allow_redirects=False,
            unbuffered=True,
        )
        body_reader = _CappedBody(self.settings.response_body_cap)
        response.deliverBody(body_reader)
        snippet = await body_reader.done
        retry_after = response.headers.getRawHeaders(b"retry-after")
        return response.code, (retry_after[0] if retry_after else None), snippet

    def _classify(self, status: int, retry_after_header: bytes | None, snippet: bytes) -> _Result:
        status_class = f"{status // 100}xx"
        text = snippet.decode("utf-8", "replace")
        if 200 <= status < 300:
            return _Result("delivered", status_class, status)
        if status == 410:
            return _Result("paused", status_class, status, text)
        if status in (408, 429) or status >= 500 or 300 <= status < 400:
            retry_after = parse_retry_after(retry_after_header, self._clock.seconds())
            return _Result("retry", status_class, status, text, retry_after)
        return _Result("dead", status_class, status, text)

    async def _record(self, job: Job, route: RouteSettings, result: _Result, attempt: int) -> None:
        """Write the outcome of an attempt to the store and the metrics."""
        now = self._clock.seconds()
        outcome = result.outcome
        changes: dict[str, Any] = {
            "attempts": attempt,
            "updated_at": now,
            "last_status": result.status,
            "last_error": result.error,
        }
        if outcome == "retry":
            deadline = job.age_from + self.settings.max_age
            if now >= deadline:
                outcome = "dead"
                changes["last_error"] = f"max_age exceeded; last error: {result.error or ''}"[:4096]
            else:
                due = retry_at(
                    now,
                    attempt,
                    self._rng,
                    self.settings.first_retry,
                    self.settings.max_backoff,
                    result.retry_after,
                )
                changes["next_due"] = min(due, deadline)
        if outcome == "dead":
            changes["state"] = DEAD
        elif outcome == "paused":
            changes["next_due"] = now
            self._pause(route.name)

        if self._metrics is not None and result.status_class != "none":
            self._metrics.webhook_requests.labels(route=route.name, outcome=outcome, status_class=result.status_class).inc()
        log_fields = {
            "job_id": job.id,
            "route": route.name,
            "attempt": attempt,
            "status": result.status,
            "status_class": result.status_class,
        }
        if outcome == "delivered":
            self._log.info("delivered {job_id} to route {route} (attempt {attempt}, {status})", **log_fields)
            try:
                await self._in_thread(self.store.delete, job.id)
            except OSError:
                self._log.failure("could not delete delivered job {job_id}", job_id=job.id)
            self._forget(job.id)
            return
        if outcome == "dead":
            self._log.warn("dead letter {job_id} for route {route} after attempt {attempt} ({status_class})", **log_fields)
        elif outcome == "retry":
            self._log.info(
                "webhook for {job_id} failed ({status_class}), retry at {due}",
                due=changes["next_due"],
                **log_fields,
            )
        new = replace(job, **changes)
        try:
            saved = await self._in_thread(self.store.save, new)
        except JobConflict as conflict:
            # An operator changed or purged the job meanwhile: they win.
            if conflict.current is None:
                self._forget(job.id)
            else:
                self._adopt(conflict.current)
            return
        except (OSError, ValueError):
            self._log.failure("could not save job {job_id}; keeping it in memory", job_id=job.id)
            saved = new
        self._adopt(saved)

    def _pause(self, route_name: str) -> None:
        if route_name in self._paused:
            return
        self._paused.add(route_name)
        if self._metrics is not None:
            self._metrics.route_paused.labels(route=route_name).set(1)
        self._log.error(
            "route {route} paused: its webhook answered 410 Gone; jobs stay queued until the route is resumed or gomail restarts",
            route=route_name,
        )

    # -- periodic work ---------------------------------------------------------------

    def _tick(self) -> None:
        try:
            self._update_gauges()
            if not self._scanning:
                self._track(Deferred.fromCoroutine(self._scan()))
            self._pump()
        except Exception:
            self._log.failure("delivery scan failed")

    async def _scan(self) -> None:
        """Reload the store if an operator changed it (or the first load failed)."""
        self._scanning = True
        self._touched = set()
        try:
            token = await self._in_thread(self.store.changes)
            if token == self._changes_token:
                return
            jobs = await self._in_thread(self.store.load_all)
            self._changes_token = token
            self._reconcile(jobs)
            self._loaded = True
        except Exception:
            self._log.failure("could not reload the delivery queue")
        finally:
            self._scanning = False
            self._touched = set()
        self._pump()

    def _reconcile(self, jobs: list[Job]) -> None:
        on_disk = {job.id: job for job in jobs}
        for job in jobs:
            if job.id in self._touched or job.id in self._in_flight:
                continue
            mine = self._jobs.get(job.id)
            if mine is None or job.revision > mine.revision:
                self._adopt(job)
        for jid in list(self._jobs):
            if jid not in on_disk and jid not in self._touched and jid not in self._in_flight:
                self._forget(jid)

    def _update_gauges(self) -> None:
        if self._metrics is None:
            return
        now = self._clock.seconds()
        counts: dict[tuple[str, str], int] = {}
        oldest: dict[str, float] = {}
        for job in self._jobs.values():
            key = (job.route, job.state)
            counts[key] = counts.get(key, 0) + 1
            if job.state == PENDING:
                oldest[job.route] = min(oldest.get(job.route, job.created_at), job.created_at)
        for key in self._gauge_keys - counts.keys():
            counts[key] = 0
        for (route, state), count in counts.items():
            self._metrics.queue_jobs.labels(route=route, state=state).set(count)
        self._gauge_keys = {key for key, count in counts.items() if count}
        for route in self._heaps:
            age = now - oldest[route] if route in oldest else 0.0
            self._metrics.queue_oldest_pending_age.labels(route=route).set(max(0.0, age))
        idle = idle_connections(self._pool) if self._pool is not None else 0
        self._metrics.http_pool_connections.labels(state="idle").set(idle)
        self._metrics.http_pool_connections.labels(state="active").set(len(self._in_flight))

    # -- intake ------------------------------------------------------------------------

    def jobs_for(self, record: dict[str, Any], now: float) -> list[Job]:
        """The jobs a message record gives (not stored).

        Args:
            record: The stored message record.
            now: Creation time for the jobs.

        Returns:
            One job per (message, route), or per recipient with
            ``fan_out: recipient``; empty when no route takes any recipient.
        """
        message_id = str(record["id"])
        envelope = record.get("envelope") or {}
        rcpt_to = envelope.get("rcpt_to")
        if rcpt_to is None:
            rcpt_to = [record["recipient"]] if record.get("recipient") else []
        jobs = []
        for route, recipients in self.router.routes_for(list(rcpt_to)):
            groups: list[tuple[str, tuple[str, ...]]]
            if route.fan_out == "recipient":
                groups = [(make_job_id(message_id, route.name, r), (r,)) for r in recipients]
            else:
                groups = [(make_job_id(message_id, route.name), tuple(recipients))]
            for jid, rcpts in groups:
                jobs.append(
                    Job(
                        id=jid,
                        message_id=message_id,
                        route=route.name,
                        recipients=rcpts,
                        created_at=now,
                        next_due=now,
                        updated_at=now,
                    )
                )
        return jobs

    def submit(self, record: dict[str, Any]) -> Deferred[list[str]]:
        """Queue a freshly stored and parsed message for delivery.

        Idempotent: submitting the same record again (after a crash) finds
        the jobs already stored and changes nothing.  Works while stopped too
        (the jobs are stored and sent at the next start).

        Args:
            record: The stored message record (see the spool).

        Returns:
            A Deferred firing, once the jobs are durable, with their ids;
            ``[]`` when no route takes any recipient.
        """
        return Deferred.fromCoroutine(self._submit_one(record))

    async def _submit_one(self, record: dict[str, Any]) -> list[str]:
        (ids,) = await self.submit_many([record])
        return ids

    def submit_many(self, records: list[dict[str, Any]]) -> Deferred[list[list[str]]]:
        """:meth:`submit` for several records at once: one store write for all.

        Returns:
            A Deferred firing with the job ids of each record, in order.
        """
        return self._track(Deferred.fromCoroutine(self._submit_many(records)))

    async def _submit_many(self, records: list[dict[str, Any]]) -> list[list[str]]:
        now = self._clock.seconds()
        per_record = [self.jobs_for(record, now) for record in records]
        for record, jobs in zip(records, per_record, strict=True):
            if not jobs:
                self._log.warn("no route takes any recipient of {message_id}", message_id=record.get("id"))
        everything = [job for jobs in per_record for job in jobs]
        if not everything:
            return [[] for _ in records]
        stored = await self._in_thread(self.store.create, everything)
        for job in stored:
            mine = self._jobs.get(job.id)
            if job.id in self._in_flight or (mine is not None and mine.revision >= job.revision):
                continue
            self._adopt(job)
        self._pump()
        return [[job.id for job in jobs] for jobs in per_record]

    # -- operators ----------------------------------------------------------------------

    def list_jobs(self, state: str | None = None, route: str | None = None) -> list[Job]:
        """Queued jobs, oldest message first.

        Args:
            state: ``pending`` or ``dead``; all if ``None``.
            route: A route name; all if ``None``.

        Raises:
            InvalidSyntax: For an unknown state.
        """
        if state is not None and state not in STATES:
            raise InvalidSyntax("unknown job state", {"state": state, "states": list(STATES)})
        return sorted(
            (job for job in self._jobs.values() if (state is None or job.state == state) and (route is None or job.route == route)),
            key=lambda job: job.id,
        )

    def get_job(self, job_id: str) -> Job:
        """One queued job.

        Raises:
            InvalidSyntax: For a malformed id.
            NotFound: If there is no such job.
        """
        job = self._jobs.get(check_job_id(job_id))
        if job is None:
            raise NotFound("no such job", {"job_id": job_id})
        return job

    def retry(self, job_id: str) -> Deferred[Job]:
        """Make a job pending and due now, whatever its state; resets its ``max_age``.

        Returns:
            A Deferred firing with the job as stored; failing with
            ``NotFound`` or ``InvalidSyntax``.
        """
        return self._track(Deferred.fromCoroutine(self._retry(job_id)))

    async def _retry(self, job_id: str) -> Job:
        check_job_id(job_id)
        job = await self._in_thread(self.store.requeue, job_id, self._clock.seconds(), notify=False)
        assert job is not None
        if job_id not in self._in_flight:
            self._adopt(job)
            self._pump()
        return job

    def retry_dead(self, route: str | None = None, since: float | None = None) -> Deferred[list[str]]:
        """Make dead jobs pending and due now.

        Args:
            route: Only this route's dead jobs.
            since: Only jobs that died at or after this time (Unix seconds).

        Returns:
            A Deferred firing with the ids requeued.
        """
        return self._track(Deferred.fromCoroutine(self._retry_dead(route, since)))

    async def _retry_dead(self, route: str | None, since: float | None) -> list[str]:
        requeued = []
        for job in self.list_jobs(DEAD, route):
            if since is not None and job.updated_at < since:
                continue
            try:
                new = await self._in_thread(self.store.requeue, job.id, self._clock.seconds(), only_dead=True, notify=False)
            except NotFound:
                self._forget(job.id)
                continue
            if new is None:
                continue
            self._adopt(new)
            requeued.append(new.id)
        self._pump()
        return requeued

    def purge(self, job_id: str) -> Deferred[Job]:
        """Remove a job for good.

        Returns:
            A Deferred firing with the job as it was; failing with
            ``NotFound`` or ``InvalidSyntax``.
        """
        return self._track(Deferred.fromCoroutine(self._purge(job_id)))

    async def _purge(self, job_id: str) -> Job:
        check_job_id(job_id)
        job = await self._in_thread(self.store.purge, job_id, notify=False)
        self._forget(job_id)
        return job

    @property
    def paused_routes(self) -> frozenset[str]:
        """Routes paused by a 410 answer."""
        return frozenset(self._paused)

    def resume_route(self, name: str) -> None:
        """Resume a route paused by a 410; its pending jobs are sent as they fall due.

        Raises:
            NotFound: If no such route is configured.
        """
        if self.router.route_named(name) is None:
            raise NotFound("no such route", {"route": name})
        if name not in self._paused:
            return
        self._paused.discard(name)
        if self._metrics is not None:
            self._metrics.route_paused.labels(route=name).set(0)
        self._log.info("route {route} resumed", route=name)
        self._pump()
