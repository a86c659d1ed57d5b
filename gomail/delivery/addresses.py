"""The optional SSRF guard: refuse webhook addresses in private ranges.

Routes are operator configuration, so by default a webhook on loopback or a
private network works.  With ``delivery.block_private_addresses: true`` two
layers refuse private, loopback, link-local, shared (CGNAT), multicast,
reserved and unspecified addresses:

* before each call the delivery service resolves the URL's host (through an
  injectable resolver) and dead-letters the job with a clear error if any
  address is refused (:func:`refusal`);
* the ``Agent`` itself connects through :func:`guarded_reactor`, whose name
  resolver drops refused addresses, so a DNS answer that changes between the
  check and the connection (DNS rebinding) still cannot reach them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.logger import Logger
from zope.interface import directlyProvides, implementer, providedBy

Resolver = Callable[[str], "Deferred[Sequence[str]]"]
"""Resolves a host name to its IP address strings."""

_log = Logger()


def is_blocked_address(address: str) -> bool:
    """Whether an IP address is outside the public internet.

    Args:
        address: An IPv4 or IPv6 address (an IPv6 zone suffix is ignored).

    Returns:
        ``True`` for private, loopback, link-local, shared, multicast,
        reserved and unspecified addresses (IPv4-mapped IPv6 included), and
        for anything that is not an IP address.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def url_host(url: str) -> str:
    """The host of a URL, without brackets; ``""`` if there is none."""
    return urlsplit(url).hostname or ""


async def refusal(url: str, resolve: Resolver | None) -> str | None:
    """Why a webhook URL is refused by the SSRF guard, or ``None``.

    Args:
        url: The webhook URL.
        resolve: Resolves a host name to addresses; ``None`` checks only IP
            literals (the guarded reactor still filters at connect time).

    Returns:
        A short reason (without the URL), or ``None`` if the URL may be used.

    Raises:
        Exception: Whatever ``resolve`` raises (a DNS failure: retry later).
    """
    host = url_host(url)
    if not host:
        return "the URL has no host"
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return "the URL's address is private" if is_blocked_address(host) else None
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return "the URL's host is localhost"
    if resolve is None:
        return None
    addresses = await resolve(host)
    if any(is_blocked_address(a) for a in addresses):
        return "the URL's host resolves to a private address"
    return None


def resolve_host(resolver: IHostnameResolver, host: str) -> Deferred[Sequence[str]]:
    """Resolve ``host`` with a Twisted ``IHostnameResolver``.

    Args:
        resolver: Usually ``reactor.nameResolver``.
        host: The host name.

    Returns:
        A Deferred firing with the address strings (possibly empty).
    """
    addresses: list[str] = []
    done: Deferred[Sequence[str]] = Deferred()

    @implementer(IResolutionReceiver)
    class _Receiver:
        def resolutionBegan(self, resolution: IHostResolution) -> None:
            pass

        def addressResolved(self, address: Any) -> None:
            addresses.append(address.host)

        def resolutionComplete(self) -> None:
            done.callback(addresses)

    resolver.resolveHostName(_Receiver(), host)
    return done


@implementer(IResolutionReceiver)
class _FilteringReceiver:
    """Passes on only the addresses :func:`is_blocked_address` allows."""

    def __init__(self, receiver: IResolutionReceiver, host: str) -> None:
        self._receiver = receiver
        self._host = host

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        self._receiver.resolutionBegan(resolution)

    def addressResolved(self, address: Any) -> None:
        if is_blocked_address(address.host):
            _log.warn("refused private address for webhook host {host}", host=self._host)
            return
        self._receiver.addressResolved(address)

    def resolutionComplete(self) -> None:
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class _FilteringResolver:
    """An ``IHostnameResolver`` that never yields a refused address."""

    def __init__(self, resolver: IHostnameResolver) -> None:
        self._resolver = resolver

    def resolveHostName(  # type: ignore[override]
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[Any] | None = None,
        transportSemantics: str = "TCP",
    ) -> IResolutionReceiver:
        self._resolver.resolveHostName(
            _FilteringReceiver(resolutionReceiver, hostName), hostName, portNumber, addressTypes, transportSemantics
        )
        return resolutionReceiver


class _GuardedReactor:
    """A reactor proxy whose ``nameResolver`` filters refused addresses."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.nameResolver = _FilteringResolver(reactor.nameResolver)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def guarded_reactor(reactor: Any) -> Any:
    """Wrap a reactor so every host name resolves only to public addresses.

    ``HostnameEndpoint`` (used by ``Agent``) resolves through
    ``reactor.nameResolver``, IP literals included, so a connection to a
    refused address fails with a DNS lookup error.

    Args:
        reactor: A reactor providing ``IReactorPluggableNameResolver``.

    Returns:
        A proxy providing the same interfaces.
    """
    if not IReactorPluggableNameResolver.providedBy(reactor):
        raise TypeError("the SSRF guard needs a reactor with a pluggable name resolver")
    proxy = _GuardedReactor(reactor)
    directlyProvides(proxy, providedBy(reactor))
    return proxy
