"""In-memory stand-ins for the SMTP receiver's collaborators."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from gomail.errors import GomailError
from gomail.interfaces import Envelope, IMessageWriter, IRecipientPolicy, ISpool, StoredMessage
from gomail.smtp.address import domain_of


@implementer(IMessageWriter)
class FakeWriter:
    """One message in a :class:`FakeSpool`, kept in memory.

    Attributes:
        chunks: Every ``write`` in order.
        envelope: The envelope given to ``commit``.
        aborted: Whether ``abort`` was called.
        commit_deferred: The Deferred returned by ``commit``.
    """

    def __init__(self, spool: FakeSpool, message_id: str) -> None:
        self._spool = spool
        self.id = message_id
        self.received_at = "2025-01-01T00:00:00Z"
        self.size = 0
        self.chunks: list[bytes] = []
        self.envelope: Envelope | None = None
        self.aborted = False
        self.commit_deferred: Deferred[StoredMessage] | None = None

    @property
    def data(self) -> bytes:
        """Everything written so far."""
        return b"".join(self.chunks)

    def write(self, data: bytes) -> Deferred[None] | None:
        """Keep ``data``; raise or push back as the spool is told to."""
        assert self.envelope is None, "write after commit"
        assert not self.aborted, "write after abort"
        if self._spool.write_error is not None:
            raise self._spool.write_error
        self.chunks.append(data)
        self.size += len(data)
        if self._spool.backpressure:
            waiting: Deferred[None] = Deferred()
            self._spool.write_waits.append(waiting)
            return waiting
        return None

    def commit(self, envelope: Envelope) -> Deferred[StoredMessage]:
        """Record ``envelope``; the Deferred fires now or when the test says."""
        assert not self.aborted, "commit after abort"
        self.envelope = envelope
        stored = StoredMessage(id=self.id, received_at=self.received_at, size=self.size)
        if self._spool.commit_error is not None:
            self.commit_deferred = fail(self._spool.commit_error)
        elif self._spool.auto_commit:
            self._spool.committed.append(self)
            self.commit_deferred = succeed(stored)
        else:
            self.commit_deferred = Deferred()
            self._spool.pending.append(self)
        return self.commit_deferred

    def abort(self) -> None:
        """Forget the message."""
        self.aborted = True


@implementer(ISpool)
class FakeSpool:
    """A spool in memory whose behaviour tests can steer.

    Attributes:
        writers: Every writer begun, in order.
        committed: Writers whose commit succeeded.
        pending: Writers whose commit waits for :meth:`fire_commit`.
        auto_commit: Whether commits succeed at once.
        backpressure: Whether every write returns a Deferred (in ``write_waits``).
        begin_error: Raised by ``begin`` when set.
        write_error: Raised by ``write`` when set.
        commit_error: The failure of ``commit`` when set.
    """

    def __init__(self, *, auto_commit: bool = True) -> None:
        self.writers: list[FakeWriter] = []
        self.committed: list[FakeWriter] = []
        self.pending: list[FakeWriter] = []
        self.write_waits: list[Deferred[None]] = []
        self.auto_commit = auto_commit
        self.backpressure = False
        self.begin_error: Exception | None = None
        self.write_error: Exception | None = None
        self.commit_error: Exception | None = None
        self.stored: list[tuple[Envelope, bytes]] = []

    def begin(self) -> FakeWriter:
        """A new writer with ids ``MSG0001``, ``MSG0002``..."""
        if self.begin_error is not None:
            raise self.begin_error
        writer = FakeWriter(self, f"MSG{len(self.writers) + 1:04d}")
        self.writers.append(writer)
        return writer

    def store(self, envelope: Envelope, raw: bytes) -> Deferred[StoredMessage]:
        """Store a whole message at once."""
        self.stored.append((envelope, raw))
        return succeed(StoredMessage(id=f"STORED{len(self.stored)}", received_at="", size=len(raw)))

    def is_writable(self) -> bool:
        """Always writable."""
        return True

    def fire_commit(self, index: int = 0) -> None:
        """Let the ``index``-th pending commit succeed."""
        writer = self.pending.pop(index)
        self.committed.append(writer)
        assert writer.commit_deferred is not None
        writer.commit_deferred.callback(StoredMessage(id=writer.id, received_at=writer.received_at, size=writer.size))

    def fail_commit(self, error: GomailError | Exception, index: int = 0) -> None:
        """Let the ``index``-th pending commit fail with ``error``."""
        writer = self.pending.pop(index)
        assert writer.commit_deferred is not None
        writer.commit_deferred.errback(error)

    def release_writes(self) -> None:
        """Fire every pending back-pressure Deferred."""
        waits, self.write_waits = self.write_waits, []
        for waiting in waits:
            waiting.callback(None)


@implementer(IRecipientPolicy)
class FakeRecipients:
    """Accepts recipients in the given domains (and ``postmaster``)."""

    def __init__(self, domains: set[str] | None = None) -> None:
        self.domains = domains if domains is not None else {"example.com"}

    def accepts(self, address: str) -> bool:
        """Whether the recipient's domain is one of ours."""
        return address.lower() == "postmaster" or domain_of(address) in self.domains


@dataclass(frozen=True)
class Decision:
    """A limiter decision."""

    allowed: bool
    retry_at: float = 0.0
    rule: str | None = None


@dataclass
class FakeLimiter:
    """A limiter whose answers tests set; it records every call.

    Attributes:
        connect: The decision (or Deferred) for ``smtp_connect``.
        message: The decision (or Deferred) for ``smtp_message``.
        recipient: The decision (or Deferred) for ``smtp_recipient``.
        calls: ``(method, args)`` in call order.
    """

    connect: Any = field(default_factory=lambda: Decision(True))
    message: Any = field(default_factory=lambda: Decision(True))
    recipient: Any = field(default_factory=lambda: Decision(True))
    calls: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def smtp_connect(self, address: str) -> Any:
        """Record and answer."""
        self.calls.append(("connect", (address,)))
        return self.connect

    def smtp_disconnect(self, address: str) -> None:
        """Record."""
        self.calls.append(("disconnect", (address,)))

    def smtp_message(self, address: str, sender_domain: str) -> Any:
        """Record and answer."""
        self.calls.append(("message", (address, sender_domain)))
        return self.message

    def smtp_recipient(self, address: str, recipient_domain: str) -> Any:
        """Record and answer."""
        self.calls.append(("recipient", (address, recipient_domain)))
        return self.recipient
