"""Tests for gomail.delivery.client and the SSRF guard in gomail.delivery.addresses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IHostnameResolver, IReactorPluggableNameResolver, IReactorTCP, IResolutionReceiver
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from gomail.delivery.addresses import guarded_reactor, is_blocked_address, refusal, resolve_host
from gomail.delivery.client import BytesProducer, idle_connections, make_http_client
from gomail.delivery.settings import DeliverySettings


@implementer(IHostnameResolver)
class StaticResolver:
    """Resolves every name to fixed addresses."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = addresses
        self.names: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IResolutionReceiver:
        self.names.append(hostName)
        resolutionReceiver.resolutionBegan(None)  # type: ignore[arg-type]
        for address in self.addresses:
            cls = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(cls("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolutionReceiver


class AddressTests(SynchronousTestCase):
    """Which addresses the SSRF guard refuses."""

    def test_blocked(self) -> None:
        """Private, loopback, link-local, shared, multicast and unspecified addresses are refused."""
        for address in (
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "fe80::1%eth0",
            "fc00::1",
            "::ffff:127.0.0.1",
            "::",
            "not an address",
        ):
            self.assertTrue(is_blocked_address(address), address)

    def test_public(self) -> None:
        """Public addresses pass."""
        for address in ("93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:93.184.216.34"):
            self.assertFalse(is_blocked_address(address), address)

    def test_refusal(self) -> None:
        """refusal checks literals and localhost without resolving, names with the resolver."""

        def resolve(host: str) -> Deferred[Sequence[str]]:
            return succeed(["192.168.0.9"])

        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(refusal("http://[::1]:80/", None))), "the URL's address is private")
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(refusal("https://localhost/x", None))), "the URL's host is localhost")
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(refusal("https://93.184.216.34/x", resolve))))
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(refusal("https://hooks.example/x", None))))
        self.assertEqual(
            self.successResultOf(Deferred.fromCoroutine(refusal("https://hooks.example/x", resolve))),
            "the URL's host resolves to a private address",
        )
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(refusal("file:///etc/passwd", None))), "the URL has no host")

    def test_resolve_host(self) -> None:
        """resolve_host collects the addresses of an IHostnameResolver."""
        resolver = StaticResolver(["93.184.216.34", "2606:2800::1"])
        self.assertEqual(self.successResultOf(resolve_host(resolver, "h.example")), ["93.184.216.34", "2606:2800::1"])

    def test_guarded_reactor_filters_names(self) -> None:
        """The guarded reactor's resolver drops refused addresses and proxies the rest of the reactor."""
        reactor = MemoryReactorClock()
        reactor.nameResolver = StaticResolver(["10.0.0.1", "93.184.216.34"])
        guarded = guarded_reactor(reactor)
        self.assertTrue(IReactorPluggableNameResolver.providedBy(guarded))
        self.assertTrue(IReactorTCP.providedBy(guarded))
        self.assertEqual(self.successResultOf(resolve_host(guarded.nameResolver, "h.example")), ["93.184.216.34"])
        self.assertIs(guarded.seconds.__self__, reactor)
        self.assertRaises(TypeError, guarded_reactor, object())


class ClientTests(SynchronousTestCase):
    """make_http_client wiring, without sockets."""

    def request(self, settings: DeliverySettings, addresses: Sequence[str]) -> tuple[MemoryReactorClock, Deferred[Any]]:
        reactor = MemoryReactorClock()
        reactor.nameResolver = StaticResolver(addresses)
        client, pool = make_http_client(reactor, settings)
        self.assertEqual((pool.maxPersistentPerHost, pool.cachedConnectionTimeout, pool.retryAutomatically), (3, 17, False))
        d = client.request("POST", "http://hooks.example:8080/in", data=b"{}", allow_redirects=False, unbuffered=True)
        return reactor, d

    def test_pool_and_connect_timeout(self) -> None:
        """The client connects through its own pool with the configured connect timeout."""
        reactor, d = self.request(DeliverySettings(max_persistent_per_host=3, pool_idle_timeout=17, connect_timeout=4), ["10.1.1.1"])
        [(host, port, _factory, timeout, _bind)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("10.1.1.1", 8080, 4))
        self.assertNoResult(d)

    def test_guard_refuses_at_connect_time(self) -> None:
        """With block_private_addresses a name resolving only to private addresses never connects."""
        settings = DeliverySettings(max_persistent_per_host=3, pool_idle_timeout=17, block_private_addresses=True)
        reactor, d = self.request(settings, ["10.1.1.1"])
        self.assertEqual(reactor.tcpClients, [])
        self.failureResultOf(d, DNSLookupError)
        self.flushLoggedErrors()

    def test_guard_allows_public(self) -> None:
        """With block_private_addresses a public address is connected to."""
        settings = DeliverySettings(max_persistent_per_host=3, pool_idle_timeout=17, block_private_addresses=True)
        reactor, _ = self.request(settings, ["10.1.1.1", "93.184.216.34"])
        self.assertEqual([c[0] for c in reactor.tcpClients], ["93.184.216.34"])

    def test_bytes_producer(self) -> None:
        """The body producer writes the whole body at once and knows its length."""
        producer = BytesProducer(b"hello")
        transport = StringTransport()
        self.successResultOf(producer.startProducing(transport))
        self.assertEqual((producer.length, transport.value()), (5, b"hello"))

    def test_idle_connections(self) -> None:
        """idle_connections counts the pool's cached connections."""
        _, pool = make_http_client(MemoryReactorClock(), DeliverySettings())
        self.assertEqual(idle_connections(pool), 0)
        pool._connections[("http", b"h", 80)] = [object(), object()]  # type: ignore[index]
        self.assertEqual(idle_connections(pool), 2)
