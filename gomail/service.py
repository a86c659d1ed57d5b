"""The service tree: pure wiring of every component from a Config.

``build_service(config, reactor, token)`` has no side effects: nothing binds,
no thread starts and no file is touched until the tree is started, so a test
can pass a ``MemoryReactorClock`` and inspect the tree.

Start order: thread pools, spool (recovery), limiter, delivery, pending work,
then the listeners.  Stop order (graceful shutdown, design.md section 3):

1. refuse new work: ``/ready`` turns 503, SMTP sessions get ``421 4.3.2`` at
   their next command outside a transaction, new HTTP requests get 503;
2. stop listening on every port at once;
3. drain SMTP sessions and HTTP requests in flight, bounded by
   ``shutdown_timeout``; then close whatever is left;
4. stop delivery (in-flight webhook calls may finish within what is left
   of the timeout; pending jobs stay on disk);
5. stop the spool (last commits, checkpoint), the limiter, the thread pools.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from gomail.api import APISite, HTTPApi
from gomail.config import Config
from gomail.delivery.client import make_http_client
from gomail.delivery.jobs import JobStore
from gomail.delivery.router import Router
from gomail.delivery.service import DeliveryService
from gomail.limiter import LimiterService
from gomail.metrics import GomailMetrics
from gomail.processor import MessageProcessor, parser_processes
from gomail.smtp.factory import SMTPFactory
from gomail.smtp.tls import load_server_tls
from gomail.spool import Spool


class ThreadPoolService(Service):
    """Starts and stops a dedicated, bounded thread pool with the tree."""

    def __init__(self, name: str, minthreads: int, maxthreads: int) -> None:
        self.name = name  # type: ignore[assignment]
        self.pool = ThreadPool(minthreads, maxthreads, name=name)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class ExecutorService(Service):
    """Owns a concurrent.futures executor (the parser processes)."""

    def __init__(self, name: str, factory: Any) -> None:
        self.name = name  # type: ignore[assignment]
        self._factory = factory
        self.executor: Any = None

    def startService(self) -> None:
        super().startService()
        self.executor = self._factory()
        # Start the worker processes now rather than on the first message.
        self.executor.submit(int)

    def stopService(self) -> None:
        super().stopService()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


class GomailService(MultiService):
    """The root service with an explicit start and stop order."""

    _log = Logger()

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.spool: Spool
        self.api: HTTPApi
        self.site: APISite
        self.smtp: SMTPFactory | None = None
        self.limiter: LimiterService
        self.delivery: DeliveryService | None = None
        self.processor: MessageProcessor
        self.listeners: list[IService] = []
        self.pools: list[ThreadPoolService] = []
        self.parsers: ExecutorService | None = None
        self.shutdown_summary: dict[str, Any] = {}
        self.metrics: GomailMetrics

    # MultiService starts children in insertion order, which is ours; the
    # privileged start (binding ports) also follows it.
    def startService(self) -> None:
        Service.startService(self)
        for pool in self.pools:
            pool.startService()
        if self.parsers is not None:
            self.parsers.startService()
            self.processor.set_parser(self.parsers.executor)
        self.spool.startService()
        self.limiter.startService()
        if self.delivery is not None:
            self.delivery.startService()
        self.processor.resume(self.spool.recovered)
        for listener in self.listeners:
            if not listener.running:
                listener.startService()
        self._log.info(
            "gomail started: HTTP on {http}, SMTP on {smtp}, spool in {spool}, domains {domains}, {routes} routes",
            http=self.config.http.listen,
            smtp=self.config.smtp.listen if self.config.smtp.enabled else "(disabled)",
            spool=self.spool.layout.root,
            domains=", ".join(self.config.domains),
            routes=len(self.config.routes),
        )

    def reload(self, config: Config, tls: CertificateOptions | None) -> None:
        """Apply what can change without a restart (SIGHUP): the rate limits
        and the SMTP certificate (so a renewed one takes effect).

        Args:
            config: The configuration read again.
            tls: ``smtp_tls(config)``, made by the caller off the reactor
                thread (it reads the certificate files).

        Other settings keep their running values until the next start; the
        log says which differ.
        """
        self.limiter.reload(config.rate_limit)
        applied = "rate limits"
        if self.smtp is not None:
            self.smtp.tls = tls
            applied += ", SMTP certificate" if tls is not None else ", SMTP without TLS"
        # The certificate's paths apply at once; compare the rest.
        running_smtp = replace(self.config.smtp, tls_certificate=config.smtp.tls_certificate, tls_private_key=config.smtp.tls_private_key)
        unchanged = [
            name
            for name in ("hostname", "data_dir", "domains", "http", "smtp", "routes", "delivery", "logging")
            if getattr(config, name) != (running_smtp if name == "smtp" else getattr(self.config, name))
        ]
        self._log.info("configuration reloaded: {applied} applied", applied=applied)
        if unchanged:
            self._log.warn("these settings changed but need a restart: {names}", names=", ".join(unchanged))

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._shutdown())

    async def _wait_while(self, busy: Callable[[], bool], deadline: float) -> None:
        """Poll ``busy`` on the clock until it is false or ``deadline`` passes."""
        while busy() and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05, lambda: None)

    async def _shutdown(self) -> None:
        deadline = self.reactor.seconds() + self.config.shutdown_timeout
        self._log.info("shutting down: draining for at most {timeout} s", timeout=self.config.shutdown_timeout)
        self.api.shutting_down = True
        self.metrics.shutting_down.set(1)
        if self.smtp is not None:
            self.smtp.begin_shutdown()
        await gatherResults([maybeDeferred(listener.stopService) for listener in self.listeners], consumeErrors=True)
        sessions_at_start = self.smtp.active_sessions if self.smtp is not None else 0
        requests_at_start = self.site.in_flight
        await self._wait_while(lambda: bool((self.smtp is not None and self.smtp.active_sessions) or self.site.in_flight), deadline)
        cut_sessions = self.smtp.active_sessions if self.smtp is not None else 0
        cut_requests = self.site.in_flight
        if self.smtp is not None and cut_sessions:
            self.smtp.close_all()
        self.site.close_connections()
        deliveries_cut = 0
        if self.delivery is not None:
            delivery = self.delivery
            stopping = maybeDeferred(delivery.stopService)
            await self._wait_while(lambda: bool(delivery.in_flight), deadline)
            deliveries_cut = self.delivery.in_flight
            if deliveries_cut:
                self.delivery.cancel_in_flight()
            await stopping
        await self._wait_while(lambda: bool(self.processor.in_flight), deadline)
        await maybeDeferred(self.spool.stopService)
        self.limiter.stopService()
        if self.parsers is not None:
            self.parsers.stopService()
        for pool in reversed(self.pools):
            pool.stopService()
        self.shutdown_summary = {
            "sessions_drained": sessions_at_start - cut_sessions,
            "sessions_cut": cut_sessions,
            "requests_drained": requests_at_start - cut_requests,
            "requests_cut": cut_requests,
            "deliveries_cut": deliveries_cut,
        }
        self._log.info(
            "shutdown complete: {sessions_drained} SMTP sessions drained ({sessions_cut} cut), "
            "{requests_drained} HTTP requests drained ({requests_cut} cut), {deliveries_cut} deliveries cut",
            **self.shutdown_summary,
        )


def smtp_tls(config: Config) -> CertificateOptions | None:
    """The SMTP listener's TLS options, or None without a certificate.

    Raises:
        TLSFilesError: The files cannot be used (the configuration check
            reads them too, so this means they changed since).
    """
    if not config.smtp.tls_certificate:
        return None
    return load_server_tls(config.smtp.tls_certificate, config.smtp.tls_private_key)


def build_service(
    config: Config,
    reactor: Any,
    token: str,
    registry: CollectorRegistry | None = None,
    http_client: Any | None = None,
) -> GomailService:
    """Build the whole service tree from ``config``; no side effects.

    Args:
        config: The validated configuration.
        reactor: The reactor (clock, threads, listeners).
        token: The HTTP API bearer token (configured or generated).
        registry: The Prometheus registry (a fresh one by default).
        http_client: A treq ``HTTPClient`` for webhooks (tests inject
            ``StubTreq``); by default one on a pooled connection pool.
    """
    root = GomailService(config, reactor)
    metrics = GomailMetrics(registry if registry is not None else CollectorRegistry())
    root.metrics = metrics

    spool_pool = ThreadPoolService("gomail-spool", 1, 2)
    work_pool = ThreadPoolService("gomail-work", 1, config.io_threads)
    root.pools = [spool_pool, work_pool]

    root.spool = Spool(config.data_dir, reactor, spool_pool.pool, metrics, commit_linger=0.05)
    root.limiter = LimiterService(config.rate_limit, reactor, metrics)
    router = Router(config.domains, config.routes)
    root.router = router  # type: ignore[attr-defined]

    if config.routes:
        pool = None
        if http_client is None:
            http_client, pool = make_http_client(reactor, config.delivery)
        # No fsync per job: the spool keeps each message in its journal until
        # a checkpoint has synced the file system, jobs included.
        store = JobStore(os.path.join(config.data_dir, "jobs"), fsync=False)
        spool = root.spool

        def load_message(message_id: str) -> Deferred[tuple[dict[str, Any], bytes]]:
            from twisted.internet.threads import deferToThreadPool

            return deferToThreadPool(reactor, work_pool.pool, lambda: (spool.read_record(message_id), spool.read_raw(message_id)))

        root.delivery = DeliveryService(
            config.delivery,
            router,
            store,
            http_client,
            reactor,
            work_pool.pool,
            load_message,
            metrics=metrics,
            rng=random.SystemRandom(),
            pool=pool,
        )

    root.processor = MessageProcessor(root.spool, reactor, work_pool.pool, root.delivery)
    if config.parser_processes != 0:
        root.parsers = ExecutorService("gomail-parsers", lambda: parser_processes(config.parser_processes or None, config.parser_nice))
    root.spool.on_stored = root.processor.message_stored

    root.api = HTTPApi(
        root.spool,
        router,
        token,
        reactor,
        metrics,
        limiter=root.limiter,
        queue=root.delivery,
        serve_metrics=config.http.metrics,
    )
    root.site = APISite(root.api.resource(), config.http.max_body_size, metrics, reactor)
    root.site.timeout = config.http.request_timeout  # type: ignore[attr-defined]
    http_listener = strports.service(config.http.listen, root.site, reactor=reactor)
    http_listener.setName("http")
    root.listeners.append(http_listener)

    if config.smtp.enabled:
        root.smtp = SMTPFactory(config.smtp.settings, root.spool, router, reactor, metrics, limiter=root.limiter, tls=smtp_tls(config))
        smtp_listener = strports.service(config.smtp.listen, root.smtp, reactor=reactor)
        smtp_listener.setName("smtp")
        root.listeners.append(smtp_listener)

    # Parent the listeners so twistd's privilegedStartService binds them
    # (port 25 before dropping privileges); our startService runs the rest.
    for listener in root.listeners:
        listener.setServiceParent(root)
    return root


__all__ = ["build_service", "GomailService", "ThreadPoolService"]
