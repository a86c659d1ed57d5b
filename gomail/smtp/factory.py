"""The factory of SMTP sessions: shared dependencies, session count, shutdown."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IOpenSSLContextFactory, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from gomail.interfaces import IRecipientPolicy, ISpool
from gomail.metrics import GomailMetrics
from gomail.smtp.protocol import SMTPServerProtocol
from gomail.smtp.settings import SMTPSettings


class SMTPFactory(ServerFactory):
    """Builds :class:`SMTPServerProtocol` sessions and keeps track of them.

    Attributes:
        settings: Limits and policies.
        spool: Where messages are written.
        recipients: Which recipients are accepted.
        clock: The time source for timeouts and tarpits.
        metrics: Metrics to update, if any.
        limiter: An optional rate limiter with ``smtp_connect(address)``,
            ``smtp_disconnect(address)``, ``smtp_message(address,
            sender_domain)`` and ``smtp_recipient(address, recipient_domain)``;
            each decision (or a Deferred of one) has ``allowed``,
            ``retry_at`` (on ``clock``) and ``rule``.
        tls: TLS options for STARTTLS (:func:`gomail.smtp.tls.load_server_tls`),
            or None to offer none.  Replacing them (SIGHUP with a renewed
            certificate) applies to every STARTTLS from then on.
    """

    protocol = SMTPServerProtocol
    _log = Logger()

    def __init__(
        self,
        settings: SMTPSettings,
        spool: ISpool,
        recipients: IRecipientPolicy,
        clock: IReactorTime,
        metrics: GomailMetrics | None = None,
        limiter: object | None = None,
        tls: IOpenSSLContextFactory | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.recipients = recipients
        self.clock = clock
        self.metrics = metrics
        self.limiter: Any = limiter
        self.tls = tls
        self._sessions: set[SMTPServerProtocol] = set()
        self._admitted: set[SMTPServerProtocol] = set()
        self._shutting_down = False
        self._drain_waiters: list[Deferred[None]] = []

    def buildProtocol(self, addr: IAddress | None) -> SMTPServerProtocol:
        """A new session; it is counted once its connection is made."""
        return SMTPServerProtocol(self)

    @property
    def active_sessions(self) -> int:
        """Open connections, including ones being refused or closed."""
        return len(self._sessions)

    @property
    def shutting_down(self) -> bool:
        """Whether :meth:`begin_shutdown` has been called."""
        return self._shutting_down

    def begin_shutdown(self) -> None:
        """Refuse new sessions and new transactions with ``421 4.3.2``.

        Transactions in progress may finish; after that each session gets
        ``421 4.3.2`` on its next command (``QUIT`` still gets ``221``).
        """
        if not self._shutting_down:
            self._log.info("SMTP shutting down with {count} sessions open", count=len(self._sessions))
        self._shutting_down = True

    def wait_drained(self) -> Deferred[None]:
        """A Deferred that fires once no session is left (at once if none is)."""
        if not self._sessions:
            return Deferred.fromCoroutine(_nothing())
        waiter: Deferred[None] = Deferred(lambda d: self._drain_waiters.remove(d))
        self._drain_waiters.append(waiter)
        return waiter

    def close_all(self) -> None:
        """Close every session: ``421 4.3.2`` then close; abort ones already closing."""
        for session in list(self._sessions):
            session.close_for_shutdown()

    def session_opened(self, session: SMTPServerProtocol) -> bool:
        """Count a new connection; whether it is within ``max_sessions``."""
        self._sessions.add(session)
        if len(self._admitted) >= self.settings.max_sessions:
            return False
        self._admitted.add(session)
        return True

    def session_closed(self, session: SMTPServerProtocol) -> None:
        """Forget a closed connection; fire :meth:`wait_drained` waiters when none is left."""
        self._sessions.discard(session)
        self._admitted.discard(session)
        if not self._sessions:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)


async def _nothing() -> None:
    """A coroutine that returns at once (for an already-fired Deferred)."""
