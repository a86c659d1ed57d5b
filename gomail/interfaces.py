"""The zope interfaces and value types passed between gomail's components."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zope.interface import Attribute, Interface


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the transport knows about a message, beside its bytes.

    Attributes:
        transport: ``"smtp"`` or ``"http"``.
        mail_from: The envelope sender; ``""`` for the null sender ``<>``.
        rcpt_to: Envelope recipients, in the order they were given.
        helo: The client's HELO/EHLO name.
        client_address: The client's IP address.
        client_port: The client's TCP port.
        client_hostname: The client's host name, if known (never looked up
            on the reply path).
        body: The SMTP ``BODY=`` type (``7BIT``, ``8BITMIME``) or ``None``.
        smtputf8: Whether the client asked for SMTPUTF8.
        tls: Whether the message arrived over TLS.
        protocol: The ``with`` protocol of the Received header
            (``ESMTP``, ``ESMTPS``, ``UTF8SMTP``, ``HTTP``...).
        request_id: The HTTP request id, or the SMTP session id.
        authentication: Authentication results known at accept time.
    """

    transport: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    helo: str | None = None
    client_address: str | None = None
    client_port: int | None = None
    client_hostname: str | None = None
    body: str | None = None
    smtputf8: bool = False
    tls: bool = False
    protocol: str | None = None
    request_id: str | None = None
    authentication: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message that is durably in the spool.

    Attributes:
        id: The message id (sorts by time, unique across restarts).
        received_at: ISO 8601 UTC time of acceptance.
        size: Size in bytes of the stored raw message.
    """

    id: str
    received_at: str
    size: int


class IMessageWriter(Interface):
    """One message being received into the spool, streamed chunk by chunk."""

    id = Attribute("The message id, known before the first byte is written.")
    received_at = Attribute("ISO 8601 UTC time the message was begun.")
    size = Attribute("Bytes written so far.")

    def write(data: bytes) -> Any:
        """Append bytes to the message.

        Returns ``None``, or a Deferred when the writer has more unwritten
        bytes buffered than it wants: the caller should stop reading from
        its client (``pauseProducing``) until that Deferred fires.
        """

    def commit(envelope: Envelope) -> Any:
        """Make the message durable; a Deferred firing with a StoredMessage.

        It fails with ``StorageFailed`` when the spool cannot store it; then
        nothing of the message is left behind.
        """

    def abort() -> None:
        """Forget the message and remove whatever was written of it."""


class ISpool(Interface):
    """The durable, on-disk store of accepted messages."""

    def begin() -> IMessageWriter:
        """Start receiving a new message; raises ``StorageFailed`` or
        ``Unavailable`` when the spool cannot take one now."""

    def store(envelope: Envelope, raw: bytes) -> Any:
        """Store a whole message at once; a Deferred firing with a
        StoredMessage once it is durable."""

    def is_writable() -> bool:
        """Whether the spool can take messages now (for ``/ready``)."""


class IRecipientPolicy(Interface):
    """Decides which envelope recipients gomail accepts at all."""

    def accepts(address: str) -> bool:
        """Whether mail for ``address`` is accepted (no relaying, ever)."""
