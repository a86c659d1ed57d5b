"""Tests for gomail.smtp.writes: replies sent at once, never out of order."""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from gomail.smtp.writes import immediate_writer


class ImmediateWriterTests(SynchronousTestCase):
    """A plain TCP transport gets a writer that sends when nothing is queued."""

    def setUp(self) -> None:
        self.ours, self.peer = socket.socketpair()
        self.addCleanup(self.peer.close)
        self.reactor = MemoryReactor()
        self.transport = tcp.Server(self.ours, Protocol(), ("127.0.0.1", 4321), None, 1, self.reactor)  # type: ignore[arg-type]
        self.addCleanup(self.ours.close)
        self.write = immediate_writer(self.transport)
        self.peer.setblocking(False)

    def received(self) -> bytes:
        """What reached the other end so far."""
        chunks = []
        while True:
            try:
                data = self.peer.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def test_sent_at_once(self) -> None:
        """With nothing queued the reply is sent now, without the reactor."""
        self.write(b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.received(), b"250 2.1.0 Ok\r\n")
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_queued_behind_queued_bytes(self) -> None:
        """Bytes already queued go first: the reply waits its turn."""
        self.transport.write(b"first ")
        self.write(b"second")
        self.assertEqual(self.received(), b"")
        self.assertIn(self.transport, self.reactor.getWriters())
        self.transport.doWrite()
        self.assertEqual(self.received(), b"first second")

    def test_partial_send_queues_the_rest(self) -> None:
        """What the socket does not take now is queued, in order."""
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        payload = bytes(range(256)) * 4096  # 1 MiB, more than the socket takes
        self.write(payload)
        self.write(b"after")
        got = self.received()
        self.assertLess(len(got), len(payload))
        self.assertIn(self.transport, self.reactor.getWriters())
        for _ in range(10000):
            if self.transport not in self.reactor.getWriters():
                break
            self.transport.doWrite()
            got += self.received()
        got += self.received()
        self.assertEqual(got, payload + b"after")

    def test_closing_connection_uses_the_queue(self) -> None:
        """After loseConnection the reply goes through Twisted's own path."""
        self.transport.loseConnection()
        self.write(b"221 2.0.0 Bye\r\n")
        self.assertEqual(self.received(), b"")
        self.assertEqual(self.transport._tempDataBuffer, [b"221 2.0.0 Bye\r\n"])

    def test_other_transports_write_as_usual(self) -> None:
        """Anything but a plain TCP connection gets its own write method."""
        transport = StringTransport()
        self.assertEqual(immediate_writer(transport), transport.write)
