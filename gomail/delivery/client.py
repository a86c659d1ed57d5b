"""The outbound HTTP client: one persistent connection pool for every route."""

from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy
from typing import Any

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from gomail.delivery.addresses import guarded_reactor
from gomail.delivery.settings import DeliverySettings


@implementer(IBodyProducer)
class BytesProducer:
    """Writes an in-memory body in one go (no cooperator, no global reactor).

    treq's default producer for ``bytes`` is a ``FileBodyProducer`` driven by
    the global cooperator, which schedules on the global reactor.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


def _body_producer(data: Any) -> IBodyProducer:
    if isinstance(data, (bytes, bytearray)):
        return BytesProducer(bytes(data))
    return IBodyProducer(data)


def _no_cookies() -> IndexableCookieJar:
    """A cookie jar that stores nothing: receivers must not share state via cookies."""
    return IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def make_http_client(reactor: Any, settings: DeliverySettings) -> tuple[HTTPClient, HTTPConnectionPool]:
    """Build the webhook client on its own persistent connection pool.

    The service passes ``allow_redirects=False`` and ``unbuffered=True`` on
    every request and applies its own timeout on its clock; this client never
    uses treq's global pool or reactor.

    Args:
        reactor: The reactor (``IReactorTCP``, ``IReactorTime``, and
            ``IReactorPluggableNameResolver`` when the SSRF guard is on).
        settings: Pool size, idle and connect timeouts, the SSRF guard.

    Returns:
        ``(client, pool)``; pass both to ``DeliveryService`` so it can close
        the pool on stop.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = settings.max_persistent_per_host
    pool.cachedConnectionTimeout = settings.pool_idle_timeout  # type: ignore[assignment]  # a float works (callLater)
    # Webhook calls are POSTs: the service decides about retries itself.
    pool.retryAutomatically = False
    agent_reactor = guarded_reactor(reactor) if settings.block_private_addresses else reactor
    agent = Agent(agent_reactor, pool=pool, connectTimeout=settings.connect_timeout)
    client = HTTPClient(agent, cookiejar=_no_cookies(), data_to_body_producer=_body_producer)
    return client, pool


def idle_connections(pool: HTTPConnectionPool) -> int:
    """How many idle keep-alive connections the pool holds.

    Reads the pool's private ``_connections`` map (Twisted has no public
    accessor); returns 0 if that ever changes.
    """
    connections = getattr(pool, "_connections", None)
    if not isinstance(connections, dict):
        return 0
    return sum(len(v) for v in connections.values())
