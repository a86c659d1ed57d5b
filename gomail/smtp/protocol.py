"""The ESMTP server protocol (RFC 5321 with PIPELINING, SIZE, 8BITMIME,
SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING and, with a certificate, STARTTLS).

Commands arrive in line mode and are dispatched by name (``do_MAIL``...);
message data (DATA, BDAT) is read in raw mode and streamed into a spool
writer, never held whole in memory.

Replies always come out in command order.  A command whose reply depends on
something asynchronous (the spool's commit, the limiter, a tarpit delay)
holds input: further pipelined bytes stay in the buffer until the reply has
been sent; the transport stops reading only once 64 KiB have piled up (a
client sending one command at a time never gets there, and pausing costs
two system calls).  The writer's back-pressure stops reading at once.
Replies are sent with one ``send()`` when nothing is queued before them
(:mod:`gomail.smtp.writes`).

Input parsing is our own loop rather than ``LineReceiver.dataReceived``: that
one throws away everything buffered after a line that is too long (we answer
``500 5.5.2`` and go on with the next line) and copies the whole buffer for
every line.  The contract is LineReceiver's: ``lineReceived`` in line mode,
``rawDataReceived`` in raw mode, ``setLineMode(extra)`` to hand back bytes
that follow raw data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

from OpenSSL.SSL import Error as SSLError
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IHandshakeListener, ISSLTransport
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from gomail.errors import GomailError
from gomail.ids import PerSecond, session_id
from gomail.interfaces import Envelope, IMessageWriter, StoredMessage
from gomail.smtp.address import AddressError, domain_of, parse_path_argument, safe_text
from gomail.smtp.data import DataDecoder, Rejection
from gomail.smtp.tls import describe_session
from gomail.smtp.writes import immediate_writer

if TYPE_CHECKING:
    from gomail.smtp.factory import SMTPFactory

_COMMAND = "command"
_DATA = "data"
_BDAT = "bdat"

_JUNK_CODES = frozenset({500, 501, 502, 503, 504, 555})
_MAX_BUFFERED = 1 << 20
_READ_AHEAD = 64 * 1024
_ABORT_GRACE = 5.0

_HELO_NAME = re.compile(r"[\x21-\x7e]{1,255}")
_BDAT_ARGS = re.compile(r"([0-9]{1,20})(?:[ \t]+(LAST))?", re.IGNORECASE)
_SIZE_VALUE = re.compile(r"[0-9]{1,20}")

_HELP = "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"
_HELP_TLS = _HELP + " STARTTLS"
# Commands that move no mail; past ``max_idle_commands`` of them since the
# last accepted message, each counts as a bad command.
_IDLE_VERBS = frozenset({"NOOP", "RSET", "VRFY", "HELP", "HELO", "EHLO"})


# The Received header's date, formatted once per second.
_rfc5322_date = PerSecond(lambda second: format_datetime(datetime.fromtimestamp(second, UTC)))


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class SMTPServerProtocol(LineReceiver):
    """One SMTP session.

    A client that half-closes (``shutdown(SHUT_WR)`` after its last
    command) still gets every reply: input already read is answered, pending
    commits included, and then the connection is closed.

    With TLS options on the factory, EHLO offers STARTTLS (RFC 3207).  On a
    listener that is TLS from the start (a ``ssl:`` endpoint) the session
    is TLS already and STARTTLS is not offered.

    Attributes:
        factory: The factory that made this session (settings, spool, policy).
        session_id: A random id for logs and the envelope's ``request_id``.
    """

    _log = Logger()
    delimiter = b"\r\n"

    def __init__(self, factory: SMTPFactory) -> None:
        """Create a session for ``factory``; nothing happens before ``makeConnection``."""
        self.factory = factory
        self.settings = factory.settings
        self._clock = factory.clock
        self._metrics = factory.metrics
        self.session_id = session_id()
        self.MAX_LENGTH = self.settings.max_line_length
        self._hostname = self.settings.hostname
        self._buf = bytearray()
        self._pos = 0
        self._busy = False
        self._skipping = False
        self._pauses: set[object] = set()
        self._read_stoppers: set[object] = set()  # pauses that stop reading from the socket
        self._send: Callable[[bytes], None] = self._not_connected
        self._out: list[bytes] = []  # replies of the current input pass, sent together
        self._direct = False  # our transport is the connection itself (no wrapper)
        self._reading_paused = False
        self._read_closed = False
        self._write_tokens: set[object] = set()
        self._write_waits: set[Deferred[Any]] = set()
        self._closing = False
        self._closed = False
        self._result: str | None = None
        self._admitted = False
        self._limiter_admitted = False
        self._peer_host: str | None = None
        self._peer_port: int | None = None
        self._helo: str | None = None
        self._esmtp = False
        self._tls = False
        self._handshake_done = False
        self._tls_info: str | None = None
        self._errors = 0
        self._idle_commands = 0  # NOOP, RSET, VRFY, HELP, HELO, EHLO since the last accepted message
        self._command = "CONNECT"
        self._mode = _COMMAND
        self._idle_call: IDelayedCall | None = None
        self._data_call: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._tarpit: Deferred[Any] | None = None
        self._writer: IMessageWriter | None = None
        self._committing = False
        self._decoder: DataDecoder | None = None
        self._mail_from: str | None = None
        self._rcpts: list[str] = []
        self._body: str | None = None
        self._smtputf8 = False
        self._bdat = False
        self._size = 0
        self._failure: Rejection | None = None
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_error: tuple[int, str, str] | None = None
        self._bdat_remaining = 0

    # -- read-only state, for the factory, tests and logs -------------------

    @property
    def in_transaction(self) -> bool:
        """Whether a mail transaction is in progress (MAIL given, not finished)."""
        return self._mail_from is not None or self._committing

    @property
    def input_mode(self) -> str:
        """``command``, ``data`` (after 354) or ``bdat`` (inside a chunk)."""
        return self._mode

    @property
    def bdat_remaining(self) -> int:
        """Octets still expected for the current BDAT chunk."""
        return self._bdat_remaining if self._mode == _BDAT else 0

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        """Admit or refuse the client, then greet it."""
        self._send = immediate_writer(self.transport)
        self._direct = getattr(self.transport, "protocol", None) is self
        self._tls = ISSLTransport.providedBy(self.transport)
        # Replies are small and each one is awaited: never hold one back
        # for Nagle (a second send before the client's ACK would wait for
        # its delayed ACK, 40 ms).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:  # pragma: no cover - not a TCP socket after all
                pass
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        host = getattr(peer, "host", None)
        port = getattr(peer, "port", None)
        self._peer_host = host if isinstance(host, str) else None
        self._peer_port = port if isinstance(port, int) else None
        # The address the limiter counted this session under (connect and
        # disconnect must agree even if the peer is re-read later).
        self._limiter_host = self._peer_host or ""
        self._admitted = self.factory.session_opened(self)
        if self._metrics is not None:
            self._metrics.smtp_sessions_active.inc()
        self._command = "CONNECT"
        if self.factory.shutting_down:
            self._close(421, "4.3.2", f"{self._hostname} Service shutting down", "shutdown")
            return
        if not self._admitted:
            self._log.warn(
                "refusing SMTP session {session} from {peer}: {limit} sessions open",
                session=self.session_id,
                peer=self._peer_host,
                limit=self.settings.max_sessions,
            )
            self._close(421, "4.7.0", f"{self._hostname} Error: too many connections", "rejected")
            return
        limiter = self.factory.limiter
        if limiter is None:
            self._greet()
            return
        try:
            decision = limiter.smtp_connect(self._limiter_host)
            if not isinstance(decision, Deferred):
                self._connect_decided(decision)
                return
        except Exception:
            self._connect_failed(Failure())
            return
        decision.addCallback(self._connect_decided)
        decision.addErrback(self._connect_failed)
        self._await(decision)

    def _not_connected(self, data: bytes) -> None:
        raise RuntimeError("reply before connectionMade")

    def _connect_failed(self, failure: Failure) -> None:
        self._log.failure("limiter.smtp_connect failed for SMTP session {session}", failure, session=self.session_id)
        if self._metrics is not None:
            self._metrics.errors.labels(category="internal").inc()
        self._close(421, "4.3.0", f"{self._hostname} Error: internal error", "error")

    def _connect_decided(self, decision: Any) -> None:
        if decision.allowed:
            self._limiter_admitted = True
            self._greet()
            return
        self._log.info(
            "rate limit refused SMTP session {session} from {peer} (rule {rule})",
            session=self.session_id,
            peer=self._peer_host,
            rule=getattr(decision, "rule", None),
        )
        if self._metrics is not None:
            self._metrics.errors.labels(category="rate_limited").inc()
        self._close(421, "4.7.0", f"{self._hostname} Error: rate limit exceeded, try again later", "rejected")

    def _greet(self) -> None:
        self._log.debug("SMTP session {session} from {peer}", session=self.session_id, peer=self._peer_host)
        self._reply(220, "", self.settings.banner)
        self._arm_idle()

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Release everything the session holds and account for it."""
        if self._closed:
            return
        self._closed = True
        self._cancel_timers()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        if self._tarpit is not None:
            tarpit, self._tarpit = self._tarpit, None
            tarpit.cancel()
        self._discard_writer()
        self._buf = bytearray()
        self._pos = 0
        result = self._result or "lost"
        if self._tls and not self._handshake_done and self._result is None and reason is not None and reason.check(SSLError) is not None:
            result = "tls_failed"
            self._log.info(
                "SMTP session {session} from {peer}: TLS handshake failed: {error}",
                session=self.session_id,
                peer=self._peer_host,
                error=str(reason.value)[:200],
            )
        self.factory.session_closed(self)
        if self._metrics is not None:
            self._metrics.smtp_sessions_active.dec()
            self._metrics.smtp_sessions.labels(result=result).inc()
        if self._limiter_admitted and self.factory.limiter is not None:
            try:
                self.factory.limiter.smtp_disconnect(self._limiter_host)
            except Exception:
                self._log.failure("limiter.smtp_disconnect failed for session {session}", session=self.session_id)
        self._log.debug("SMTP session {session} ended: {result}", session=self.session_id, result=result)

    def close_for_shutdown(self) -> None:
        """Say ``421 4.3.2`` and close; abort a connection that is already closing."""
        if self._closed:
            return
        if self._closing:
            self._abort()
            return
        self._command = "SHUTDOWN"
        self._close(421, "4.3.2", f"{self._hostname} Service shutting down", "shutdown")

    def _abort(self) -> None:
        call, self._abort_call = self._abort_call, None
        if call is not None and call.active():
            call.cancel()
        if self._closed:
            return
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Buffer ``data`` and process as much of it as the session's state allows."""
        if self._closing or self._closed:
            return
        if data:
            if self._tls and not self._handshake_done:
                self.handshakeCompleted()  # behind a wrapper the TLS layer cannot tell us
            self._buf += data
            if self._idle_call is not None and self._idle_call.active():
                self._idle_call.reset(self.settings.idle_timeout)
            if self._pauses and not self._reading_paused and len(self._buf) - self._pos > _READ_AHEAD:
                self._stop_reading()
        if self._busy:
            return
        if self._pauses and len(self._buf) - self._pos > _MAX_BUFFERED:
            self._log.warn("SMTP session {session}: too much pipelined input", session=self.session_id)
            self._close(421, "4.7.0", f"{self._hostname} Error: too much pipelined input", "error")
            return
        self._busy = True
        try:
            self._process()
        except Exception:
            self._log.failure("unexpected error in SMTP session {session}", session=self.session_id)
            self._command = "INTERNAL"
            self._close(421, "4.3.0", f"{self._hostname} Error: internal error", "error")
        finally:
            self._busy = False
            if self._pos:
                del self._buf[: self._pos]
                self._pos = 0
            self._flush_replies()
        if self._read_closed and not self._pauses:
            self._input_ended()

    def readConnectionLost(self) -> None:
        """The client sends nothing more: answer what it sent, then close."""
        self._read_closed = True
        self.dataReceived(b"")

    def writeConnectionLost(self) -> None:
        """Our side was half-closed (we never do that): close the rest."""
        self._lose_connection()

    def _input_ended(self) -> None:
        """Everything the client sent before its half-close has been answered."""
        if self._closing or self._closed:
            return
        self._log.debug("SMTP session {session}: the client closed its side", session=self.session_id)
        self._closing = True
        self._cancel_timers()
        self._discard_writer()
        self._lose_connection()

    def _process(self) -> None:
        buf = self._buf
        while not self._pauses and not self._closing and not self._closed:
            buf = self._buf
            if self._pos >= len(buf):
                break
            if not self.line_mode:
                data = bytes(buf[self._pos :])
                del buf[:]
                self._pos = 0
                self.rawDataReceived(data)
                continue
            newline = buf.find(b"\n", self._pos)
            if self._skipping:
                if newline < 0:
                    self._pos = len(buf)
                    break
                self._pos = newline + 1
                self._skipping = False
                continue
            if newline < 0:
                if len(buf) - self._pos > self.MAX_LENGTH:
                    self._pos = len(buf)
                    self._skipping = True
                    self._line_too_long()
                break
            end = newline - 1 if newline > self._pos and buf[newline - 1] == 13 else newline
            line = bytes(buf[self._pos : end])
            self._pos = newline + 1
            if len(line) + 2 > self.MAX_LENGTH:
                self._line_too_long()
                continue
            self.lineReceived(line)

    def clearLineBuffer(self) -> bytes:
        """Forget buffered input and return it."""
        data = bytes(self._buf[self._pos :])
        del self._buf[:]
        self._pos = 0
        return data

    def setRawMode(self) -> None:
        """Send further input to ``rawDataReceived``."""
        self.line_mode = 0

    def setLineMode(self, extra: bytes = b"") -> None:
        """Send further input to ``lineReceived``, starting with ``extra``."""
        self.line_mode = 1
        if extra and not self._closed:
            self._buf[self._pos : self._pos] = extra

    def pauseProducing(self) -> None:
        """Stop reading from the client (IPushProducer)."""
        self._pause("producer")

    def resumeProducing(self) -> None:
        """Read from the client again (IPushProducer)."""
        self._resume("producer")

    def stopProducing(self) -> None:
        """Stop for good (IPushProducer)."""
        self._lose_connection()

    def _pause(self, token: object, *, read: bool = True) -> None:
        """Hold input until ``token`` is resumed.

        Args:
            token: What the session waits for.
            read: Whether to stop reading from the socket too.  Waiting for
                a reply (a commit, the limiter) on a plain connection does
                not: a client sending one command at a time has nothing more
                to send, and pausing the transport costs two system calls
                per message.  Input that piles up past ``_READ_AHEAD`` stops
                reading anyway.
        """
        self._pauses.add(token)
        if read:
            self._read_stoppers.add(token)
            self._stop_reading()

    def _stop_reading(self) -> None:
        if not self._reading_paused and not self._closing and not self._closed:
            self._reading_paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _resume(self, token: object) -> None:
        if token not in self._pauses:
            return
        self._pauses.discard(token)
        self._read_stoppers.discard(token)
        if self._pauses or self._closing or self._closed:
            return
        self._arm_idle()
        # Answer what is buffered before reading more: if that closes the
        # session (a pipelined QUIT), reading stays off, so the client's
        # EOF cannot end the connection before the replies are sent (behind
        # TLS, an EOF read drops the unsent replies).
        self.dataReceived(b"")
        if not self._reading_paused or self._closing or self._closed:
            return
        if not self._read_stoppers and len(self._buf) - self._pos <= _READ_AHEAD:
            self._reading_paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _line_too_long(self) -> None:
        self._command = "UNKNOWN"
        self._reply(500, "5.5.2", "Error: line too long")

    def lineReceived(self, line: bytes) -> None:
        """Dispatch one command line to its ``do_<VERB>`` method."""
        self._command = "UNKNOWN"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(500, "5.5.2", "Error: bad UTF-8 syntax")
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler: Callable[[str], Deferred[Any] | None] | None = None
        if verb.isascii() and verb.isalpha():
            handler = getattr(self, "do_" + verb, None)
            if handler is not None:
                self._command = verb
        if self.factory.shutting_down and verb != "QUIT" and not self.in_transaction:
            self._close(421, "4.3.2", f"{self._hostname} Service shutting down", "shutdown")
            return
        if handler is None:
            if text.strip():
                self._reply(500, "5.5.1", "Error: command not recognized")
            else:
                self._reply(500, "5.5.2", "Error: bad syntax")
            return
        try:
            result = handler(arg.strip())
        except Exception:
            self._log.failure("error in {command} in SMTP session {session}", command=verb, session=self.session_id)
            self._internal_error()
            return
        if result is not None:
            self._await(result)
        elif verb in _IDLE_VERBS:
            self._idle_command()

    def rawDataReceived(self, data: bytes) -> None:
        """Message data: DATA content or a BDAT chunk."""
        if self._mode == _DATA:
            self._data_received(data)
        elif self._mode == _BDAT:
            self._chunk_received(data)
        else:  # pragma: no cover - raw mode is only entered for DATA and BDAT
            self.setLineMode(data)

    # -- replies ------------------------------------------------------------

    def _reply(self, code: int, enhanced: str, text: str) -> None:
        """Send one reply line (``enhanced`` may be empty) and count it."""
        if self._closing or self._closed:
            return
        line = f"{code} {enhanced} {text}" if enhanced else f"{code} {text}"
        self._emit(line.encode("utf-8") + b"\r\n")
        self._count_reply(code)

    def _reply_lines(self, code: int, lines: list[str]) -> None:
        """Send a multi-line reply."""
        if self._closing or self._closed:
            return
        last = len(lines) - 1
        out = [f"{code}{' ' if i == last else '-'}{text}\r\n" for i, text in enumerate(lines)]
        self._emit("".join(out).encode("utf-8"))
        self._count_reply(code)

    def _emit(self, data: bytes) -> None:
        """Send a reply; inside an input pass, with the pass's other replies.

        A pipelining client's commands arrive together and are answered in
        one ``send()`` at the end of the pass (PIPELINING, RFC 2920 section
        3.2), as Twisted's own buffering did.
        """
        if self._busy:
            self._out.append(data)
        else:
            self._send(data)

    def _flush_replies(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out = []
            self._send(data)

    def _count_reply(self, code: int) -> None:
        if self._metrics is not None:
            self._metrics.child(self._metrics.smtp_replies, self._command, str(code)).inc()
        if code in _JUNK_CODES:
            self._count_error()

    def _count_error(self) -> None:
        self._errors += 1
        if self._errors >= self.settings.junk_command_limit:
            self._log.info("SMTP session {session} from {peer}: too many errors", session=self.session_id, peer=self._peer_host)
            self._close(421, "4.7.0", f"{self._hostname} Error: too many errors", "error")

    def _idle_command(self) -> None:
        """A command that moves no mail (NOOP, RSET, VRFY, HELP, HELO, EHLO):
        past ``max_idle_commands`` since the last accepted message it counts
        as an error."""
        self._idle_commands += 1
        if self._idle_commands > self.settings.max_idle_commands:
            self._count_error()

    def _reply_error(self, error: GomailError) -> None:
        """Reply with a categorised error; a 421 closes the session."""
        code, enhanced = error.smtp_reply()
        text = safe_text(error.message, 200)
        if self._metrics is not None:
            self._metrics.errors.labels(category=error.category).inc()
        if code == 421:
            self._close(code, enhanced, f"{self._hostname} {text}", "error")
        else:
            self._reply(code, enhanced, text)

    def _internal_error(self) -> None:
        if self._metrics is not None:
            self._metrics.errors.labels(category="internal").inc()
        self._reset_transaction()
        self._mode = _COMMAND
        self.setLineMode()
        self._reply(451, "4.3.0", "Error: internal error")

    def _close(self, code: int, enhanced: str, text: str, result: str) -> None:
        """Send a last reply and close the connection."""
        if self._closing or self._closed:
            return
        self._reply(code, enhanced, text)
        self._flush_replies()
        self._closing = True
        if self._result is None:
            self._result = result
        self._cancel_timers()
        self._discard_writer()
        self._lose_connection()

    def _lose_connection(self) -> None:
        """Close once the replies are out, within ``_ABORT_GRACE`` seconds.

        A client that stops reading, or one that asked for TLS and never
        completes the handshake (the reply waits for it in the TLS layer),
        would otherwise hold the connection and its session slot for ever.
        """
        self.transport.loseConnection()  # type: ignore[union-attr]
        if self._abort_call is None and not self._closed:
            self._abort_call = self._clock.callLater(_ABORT_GRACE, self._abort)

    def _await(self, pending: Deferred[Any]) -> None:
        """Hold further input until ``pending`` (which sends its own reply) fires."""
        token = object()
        fired = False

        def failed(failure: Failure) -> None:
            try:
                if self._closed or self._closing:
                    if not failure.check(CancelledError):
                        self._log.failure("error after SMTP session {session} closed", failure, session=self.session_id)
                else:
                    self._log.failure("error in {command} in SMTP session {session}", failure, command=self._command, session=self.session_id)
                    self._internal_error()
            finally:
                done(None)

        def done(_: object) -> None:
            nonlocal fired
            fired = True
            self._resume(token)

        pending.addCallbacks(done, failed)
        if not fired:
            # Keep reading only where a half-close reaches us (a plain
            # connection): behind a wrapper (PROXY protocol, TLS) the
            # client's EOF would close the session before this reply.
            self._pause(token, read=not self._direct)

    # -- timers -------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self._closing or self._closed:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.settings.idle_timeout)
        else:
            self._idle_call = self._clock.callLater(self.settings.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        """The idle timer ran out: a timeout, unless the session waits on us, not on the client."""
        self._idle_call = None
        if self._pauses:
            self._arm_idle()
            return
        self._timed_out()

    def _start_data_timer(self) -> None:
        if self._data_call is None or not self._data_call.active():
            self._data_call = self._clock.callLater(self.settings.data_timeout, self._timed_out)

    def _stop_data_timer(self) -> None:
        if self._data_call is not None and self._data_call.active():
            self._data_call.cancel()
        self._data_call = None

    def _cancel_timers(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        self._stop_data_timer()

    def _timed_out(self) -> None:
        self._idle_call = None
        self._data_call = None
        self._log.info(
            "SMTP session {session} from {peer} timed out in {mode} mode",
            session=self.session_id,
            peer=self._peer_host,
            mode=self._mode,
        )
        if self._metrics is not None:
            self._metrics.errors.labels(category="timeout").inc()
            if self._mode != _COMMAND or self._writer is not None:
                self._metrics.messages_rejected.labels(transport="smtp", category="timeout").inc()
        self._command = "TIMEOUT"
        self._close(421, "4.4.2", f"{self._hostname} Error: timeout exceeded", "timeout")

    # -- commands -----------------------------------------------------------

    def do_EHLO(self, arg: str) -> None:
        """EHLO: greet and list the extensions (RFC 5321 4.1.1.1)."""
        if not self._hello(arg, "EHLO"):
            return
        self._esmtp = True
        lines = [self._hostname, "PIPELINING", f"SIZE {self.settings.max_message_size}"]
        if self._offers_tls():
            lines.append("STARTTLS")
        lines += ["8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING"]
        self._reply_lines(250, lines)

    def _offers_tls(self) -> bool:
        return self.factory.tls is not None and not self._tls and callable(getattr(self.transport, "startTLS", None))

    def do_STARTTLS(self, arg: str) -> None:
        """STARTTLS (RFC 3207): say 220, then TLS; the session starts over.

        Commands pipelined behind STARTTLS were sent in clear text and are
        discarded (RFC 3207 section 4.2; Postfix's CVE-2011-0411 fix).
        """
        if arg:
            self._reply(501, "5.5.4", "Syntax: STARTTLS")
            return
        if self._tls:
            self._reply(503, "5.5.1", "Error: TLS already active")
            return
        options = self.factory.tls
        if not self._offers_tls() or options is None:
            self._reply(502, "5.5.1", "Error: command not implemented")
            return
        if not self._esmtp:
            self._reply(503, "5.5.1", "Error: send EHLO first")
            return
        if self.in_transaction:
            self._reply(503, "5.5.1", "Error: MAIL transaction in progress")
            return
        discarded = len(self._buf) - self._pos
        if discarded > 0:
            self._pos = len(self._buf)
            self._log.info(
                "SMTP session {session} from {peer}: {octets} octets sent behind STARTTLS discarded",
                session=self.session_id,
                peer=self._peer_host,
                octets=discarded,
            )
        self._reply(220, "2.0.0", "Ready to start TLS")
        self._flush_replies()  # in clear text, before the handshake
        # Everything learnt before is forgotten (RFC 3207 section 4.2).
        self._reset_transaction()
        self._helo = None
        self._esmtp = False
        self._tls = True
        self._direct = False  # the TLS layer now stands between us and the socket
        self.transport.startTLS(options)  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done (IHandshakeListener): note its version and cipher.

        Also called for the first bytes read over TLS: behind a PROXY-protocol
        wrapper the TLS layer tells the wrapper, not us, and data only comes
        once the handshake is done.
        """
        if self._handshake_done:
            return
        self._handshake_done = True
        self._tls_info = describe_session(self.transport)
        self._log.debug("SMTP session {session}: {tls}", session=self.session_id, tls=self._tls_info or "TLS")

    def do_HELO(self, arg: str) -> None:
        """HELO: greet without extensions."""
        if not self._hello(arg, "HELO"):
            return
        self._esmtp = False
        self._reply(250, "", self._hostname)

    def _hello(self, arg: str, verb: str) -> bool:
        if _HELO_NAME.fullmatch(arg) is None:
            self._reply(501, "5.5.4", f"Syntax: {verb} hostname")
            return False
        self._reset_transaction()
        self._helo = arg
        self._refresh_peer()
        return True

    def _refresh_peer(self) -> None:
        """Read the client's address again: behind a PROXY-protocol endpoint
        (``haproxy:``) the real client is known only once the proxy's header
        has arrived, which is before the client's first command."""
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        if isinstance(host, str):
            self._peer_host = host
            self._peer_port = port if isinstance(port, int) else None

    def do_MAIL(self, arg: str) -> Deferred[Any] | None:
        """MAIL FROM: start a transaction, with SIZE, BODY and SMTPUTF8 parameters."""
        if self._helo is None:
            self._reply(503, "5.5.1", "Error: send HELO/EHLO first")
            return None
        if self._mail_from is not None or self._committing:
            self._reply(503, "5.5.1", "Error: nested MAIL command")
            return None
        if arg[:5].upper() != "FROM:":
            self._reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return None
        try:
            sender, params = parse_path_argument(arg, smtputf8_allowed=True)
        except AddressError as error:
            self._reply(*error.smtp_reply(), error.message)
            return None
        body: str | None = None
        smtputf8 = False
        for key, value in params.items():
            if key == "SIZE":
                if value is None or _SIZE_VALUE.fullmatch(value) is None:
                    self._reply(501, "5.5.4", "Error: bad SIZE syntax")
                    return None
                if int(value) > self.settings.max_message_size:
                    self._rejected("too_large")
                    self._reply(552, "5.3.4", "Message size exceeds fixed limit")
                    return None
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self._reply(501, "5.5.4", "Error: unsupported BODY type")
                    return None
                body = value.upper()
            elif key == "SMTPUTF8":
                if value is not None:
                    self._reply(501, "5.5.4", "Error: SMTPUTF8 takes no value")
                    return None
                smtputf8 = True
            else:
                self._reply(555, "5.5.4", f"Unsupported option: {key}")
                return None

        def accept() -> None:
            self._mail_from = sender
            self._body = body
            self._smtputf8 = smtputf8
            self._reply(250, "2.1.0", "Ok")

        limiter = self.factory.limiter
        if limiter is None:
            accept()
            return None
        return self._check_limit(limiter.smtp_message(self._peer_host or "", domain_of(sender) or None), accept, "MAIL")

    def do_RCPT(self, arg: str) -> Deferred[Any] | None:
        """RCPT TO: add a recipient that the recipient policy accepts."""
        if self._mail_from is None:
            self._reply(503, "5.5.1", "Error: need MAIL command")
            return None
        if self._bdat:
            self._reply(503, "5.5.1", "Error: RCPT after BDAT")
            return None
        if arg[:3].upper() != "TO:":
            self._reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return None
        try:
            address, params = parse_path_argument(arg, smtputf8_allowed=self._smtputf8)
        except AddressError as error:
            self._reply(*error.smtp_reply(), error.message)
            return None
        if params:
            self._reply(555, "5.5.4", f"Unsupported option: {next(iter(params))}")
            return None
        if address in self._rcpts:
            self._reply(250, "2.1.5", "Ok")
            return None
        if len(self._rcpts) >= self.settings.max_recipients:
            self._reply(452, "4.5.3", "Error: too many recipients")
            return None
        if not self.factory.recipients.accepts(address):
            self._log.info("SMTP session {session}: relay access denied for {address}", session=self.session_id, address=address)
            self._reply(550, "5.7.1", f"<{address}>: Relay access denied")
            return None

        def accept() -> None:
            self._rcpts.append(address)
            self._reply(250, "2.1.5", "Ok")

        limiter = self.factory.limiter
        if limiter is None:
            accept()
            return None
        return self._check_limit(limiter.smtp_recipient(self._peer_host or "", domain_of(address) or None), accept, "RCPT")

    def do_DATA(self, arg: str) -> None:
        """DATA: receive the message up to ``<CRLF>.<CRLF>``."""
        if arg:
            self._reply(501, "5.5.4", "Syntax: DATA")
            return
        if self._mail_from is None:
            self._reply(503, "5.5.1", "Error: need MAIL command")
            return
        if self._bdat:
            self._reply(503, "5.5.1", "Error: DATA after BDAT")
            return
        if not self._rcpts:
            self._reply(554, "5.5.1", "Error: no valid recipients")
            return
        error = self._open_writer()
        if error is None and self._failure is not None:
            error = (self._failure.code, self._failure.enhanced, self._failure.text)
        if error is not None:
            if self._failure is not None:
                self._rejected(self._failure.category)
            self._reset_transaction()
            self._reply(*error)
            return
        s = self.settings
        self._decoder = DataDecoder(
            max_line_length=s.max_data_line_length,
            long_line_policy=s.long_line_policy,
            bare_newline_policy=s.bare_newline_policy,
            max_header_bytes=s.max_header_bytes,
        )
        self._mode = _DATA
        self.setRawMode()
        self._start_data_timer()
        self._reply(354, "", "End data with <CR><LF>.<CR><LF>")

    def do_BDAT(self, arg: str) -> None:
        """BDAT: receive one chunk of exactly the given size (RFC 3030)."""
        match = _BDAT_ARGS.fullmatch(arg)
        if match is None:
            self._reply(501, "5.5.4", "Syntax: BDAT count [LAST]")
            return
        error: tuple[int, str, str] | None = None
        if self._mail_from is None:
            error = (503, "5.5.1", "Error: need MAIL command")
        elif not self._rcpts:
            error = (554, "5.5.1", "Error: no valid recipients")
        elif not self._bdat:
            error = self._open_writer()
            if error is None:
                self._bdat = True
                self._start_data_timer()
        self._chunk_error = error
        self._chunk_size = int(match.group(1))
        self._chunk_last = match.group(2) is not None
        self._bdat_remaining = self._chunk_size
        self._mode = _BDAT
        self.setRawMode()
        if self._bdat_remaining == 0:
            self._end_of_chunk(b"")

    def do_RSET(self, arg: str) -> None:
        """RSET: abandon the transaction."""
        if arg:
            self._reply(501, "5.5.4", "Syntax: RSET")
            return
        self._reset_transaction()
        self._reply(250, "2.0.0", "Ok")

    def do_NOOP(self, arg: str) -> None:
        """NOOP: do nothing (an argument is allowed and ignored)."""
        self._reply(250, "2.0.0", "Ok")

    def do_QUIT(self, arg: str) -> None:
        """QUIT: say goodbye and close."""
        self._close(221, "2.0.0", "Bye", "ok")

    def do_VRFY(self, arg: str) -> None:
        """VRFY: never verify (RFC 5321 3.5.3 allows 252)."""
        if not arg:
            self._reply(501, "5.5.4", "Syntax: VRFY address")
            return
        self._reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")

    def do_HELP(self, arg: str) -> None:
        """HELP: list the commands."""
        self._reply(214, "2.0.0", _HELP_TLS if self._offers_tls() else _HELP)

    # -- limits -------------------------------------------------------------

    def _check_limit(self, decision: Any, accept: Callable[[], None], command: str) -> Deferred[Any] | None:
        """Apply a limiter decision (or a Deferred of one) to MAIL or RCPT."""
        if isinstance(decision, Deferred):
            return decision.addCallback(self._apply_decision, accept, command)
        return self._apply_decision(decision, accept, command)

    def _apply_decision(self, decision: Any, accept: Callable[[], None], command: str) -> Deferred[Any] | None:
        if decision.allowed:
            accept()
            return None
        self._log.info(
            "rate limit refused {command} in SMTP session {session} from {peer} (rule {rule})",
            command=command,
            session=self.session_id,
            peer=self._peer_host,
            rule=getattr(decision, "rule", None),
        )
        if command == "MAIL":
            self._rejected("rate_limited")
        if self._metrics is not None:
            self._metrics.errors.labels(category="rate_limited").inc()
        if self.settings.tarpit_seconds > 0:
            self._tarpit = deferLater(self._clock, self.settings.tarpit_seconds, self._rate_limited, decision)
            return self._tarpit
        self._rate_limited(decision)
        return None

    def _rate_limited(self, decision: Any) -> None:
        self._tarpit = None
        wait = float(getattr(decision, "retry_at", 0.0)) - self._clock.seconds()
        seconds = max(1, math.ceil(wait)) if math.isfinite(wait) else 3600
        self._reply(450, "4.7.1", f"Error: rate limit exceeded, try again in {min(seconds, 86400)} seconds")

    def _rejected(self, category: str) -> None:
        if self._metrics is not None:
            self._metrics.messages_rejected.labels(transport="smtp", category=category).inc()

    # -- message data -------------------------------------------------------

    def _open_writer(self) -> tuple[int, str, str] | None:
        """Begin a message in the spool and write our Received header to it."""
        try:
            writer = self.factory.spool.begin()
        except GomailError as error:
            self._log.warn("spool refused a message in SMTP session {session}: {error}", session=self.session_id, error=error)
            if self._metrics is not None:
                self._metrics.errors.labels(category=error.category).inc()
            self._rejected(error.category)
            code, enhanced = error.smtp_reply()
            if code == 421:
                code = 451
            return code, enhanced, safe_text(error.message, 200)
        except Exception:
            self._log.failure("spool.begin() failed in SMTP session {session}", session=self.session_id)
            self._rejected("internal")
            return 451, "4.3.0", "Error: internal error"
        self._writer = writer
        self._size = 0
        self._failure = None
        self._write(self._received_header(writer))
        return None

    def _received_header(self, writer: IMessageWriter) -> bytes:
        """The ``Received:`` trace header (RFC 5321 4.4) for the current transaction."""
        host = self._peer_host
        if host is None:
            client = "(unknown)"
        else:
            client = f"(unknown [{'IPv6:' + host if ':' in host else host}])"
        when = _rfc5322_date(int(self._clock.seconds()))
        tls = f"\t(using {self._tls_info})\r\n" if self._tls and self._tls_info else ""
        header = (
            f"Received: from {self._helo or 'unknown'} {client}\r\n{tls}"
            f"\tby {self._hostname} (gomail) with {self._protocol_name()} id {writer.id}"
        )
        if len(self._rcpts) == 1:
            header += f"\r\n\tfor <{self._rcpts[0]}>; {when}\r\n"
        else:
            header += f";\r\n\t{when}\r\n"
        return header.encode("utf-8")

    def _protocol_name(self) -> str:
        """The ``with`` keyword of RFC 3848 / RFC 6531 (no AUTH: gomail has no users)."""
        if self._smtputf8:
            return "UTF8SMTPS" if self._tls else "UTF8SMTP"
        if not self._esmtp:
            return "SMTP"  # the registry has no TLS name for HELO sessions
        return "ESMTPS" if self._tls else "ESMTP"

    def _envelope(self) -> Envelope:
        assert self._mail_from is not None
        return Envelope(
            transport="smtp",
            mail_from=self._mail_from,
            rcpt_to=tuple(self._rcpts),
            helo=self._helo,
            client_address=self._peer_host,
            client_port=self._peer_port,
            body=self._body,
            smtputf8=self._smtputf8,
            tls=self._tls,
            protocol=self._protocol_name(),
            request_id=self.session_id,
        )

    def _data_received(self, data: bytes) -> None:
        decoder = self._decoder
        assert decoder is not None
        out, rest = decoder.feed(data)
        if out:
            self._deliver(out)
        if decoder.rejection is not None:
            self._discard_writer()
        if rest is not None:
            self._stop_data_timer()
            self._mode = _COMMAND
            self.setLineMode(rest)
            # The decoder's verdict does not depend on how the data was cut
            # into packets; size and storage failures come second.
            self._finish_message(decoder.rejection or self._failure)

    def _chunk_received(self, data: bytes) -> None:
        take = data[: self._bdat_remaining]
        self._bdat_remaining -= len(take)
        if self._chunk_error is None:
            self._deliver(take)
        if self._bdat_remaining == 0:
            self._end_of_chunk(data[len(take) :])
        # otherwise all of data was part of the chunk

    def _end_of_chunk(self, rest: bytes) -> None:
        self._mode = _COMMAND
        self.setLineMode(rest)
        if self._chunk_error is not None:
            self._reply(*self._chunk_error)
            return
        if not self._chunk_last:
            self._reply(250, "2.0.0", f"{self._chunk_size} octets received")
            return
        self._stop_data_timer()
        self._finish_message(self._failure)

    def _deliver(self, chunk: bytes) -> None:
        """Count ``chunk`` against the size limit and pass it to the writer."""
        if not chunk or self._failure is not None:
            return
        self._size += len(chunk)
        if self._size > self.settings.max_message_size:
            self._fail(Rejection(552, "5.3.4", "Error: message too large", "too_large"))
            return
        self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            result = writer.write(chunk)
        except Exception as error:
            self._write_failed(Failure(error))
            return
        if not isinstance(result, Deferred):
            return
        token = object()
        self._write_tokens.add(token)

        def written(_: object) -> None:
            self._write_tokens.discard(token)
            self._write_waits.discard(result)
            self._resume(token)

        def failed(failure: Failure) -> None:
            if writer is self._writer:
                self._write_failed(failure)

        result.addErrback(failed)
        result.addBoth(written)
        if token in self._write_tokens:
            self._write_waits.add(result)
            self._pause(token)

    def _write_failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, GomailError):
            self._log.warn("spool write failed in SMTP session {session}: {error}", session=self.session_id, error=error)
            code, enhanced = error.smtp_reply()
            rejection = Rejection(code, enhanced, safe_text(error.message, 200), error.category)
        else:
            self._log.failure("spool write failed in SMTP session {session}", failure, session=self.session_id)
            rejection = Rejection(451, "4.3.0", "Error: internal error", "internal")
        if self._metrics is not None:
            self._metrics.errors.labels(category=rejection.category).inc()
        self._fail(rejection)

    def _fail(self, rejection: Rejection) -> None:
        """Refuse the message being received: stop storing it, answer at its end."""
        if self._failure is None:
            self._failure = rejection
        self._discard_writer()

    def _discard_writer(self) -> None:
        """Abort the message being written (unless it is being committed)."""
        writer, self._writer = self._writer, None
        for token in list(self._write_tokens):
            self._write_tokens.discard(token)
            self._resume(token)
        self._write_waits = set()
        if writer is None or self._committing:
            return
        try:
            writer.abort()
        except Exception:
            self._log.failure("writer.abort() failed in SMTP session {session}", session=self.session_id)

    def _reset_transaction(self) -> None:
        self._discard_writer()
        self._mail_from = None
        self._rcpts = []
        self._body = None
        self._smtputf8 = False
        self._decoder = None
        self._bdat = False
        self._size = 0
        self._failure = None
        self._stop_data_timer()

    def _finish_message(self, rejection: Rejection | None) -> None:
        """Commit the received message and answer; or answer why it was refused.

        The usual case (all data written, nothing refused) is plain
        callbacks on the commit's Deferred: this runs for every message,
        and a coroutine's machinery measured a tenth of its cost.

        Args:
            rejection: Why the message is refused, if it is.
        """
        waits = [d for d in self._write_waits if not d.called]
        if waits:
            self._await(Deferred.fromCoroutine(self._finish_after_writes(waits, rejection)))
            return
        pending = self._commit_or_refuse(rejection)
        if pending is not None:
            self._await(pending)

    async def _finish_after_writes(self, waits: list[Deferred[Any]], rejection: Rejection | None) -> None:
        """Wait for the spool's writes to land, then commit or refuse."""
        try:
            await DeferredList(waits)
        except BaseException:
            self._end_transaction(None)
            raise
        pending = self._commit_or_refuse(rejection)
        if pending is not None:
            await pending

    def _commit_or_refuse(self, rejection: Rejection | None) -> Deferred[Any] | None:
        """Start the commit (a Deferred that answers when it fires), or answer now.

        Whatever happens, the transaction ends exactly once, after the reply.
        """
        writer = self._writer
        if rejection is None:
            rejection = self._failure
        if rejection is not None or writer is None:
            failure = rejection or Rejection(451, "4.3.0", "Error: internal error", "internal")
            try:
                self._log.info(
                    "SMTP session {session}: message refused: {code} {enhanced} {text}",
                    session=self.session_id,
                    code=failure.code,
                    enhanced=failure.enhanced,
                    text=failure.text,
                )
                self._rejected(failure.category)
                self._reply(failure.code, failure.enhanced, failure.text)
            finally:
                self._end_transaction(None)
            return None
        envelope = self._envelope()
        self._committing = True
        try:
            result = writer.commit(envelope)
        except Exception as error:  # noqa: BLE001 - answered like a failed commit
            result = fail(error)
        pending = result if isinstance(result, Deferred) else succeed(result)
        pending.addCallbacks(self._committed, self._commit_failed, callbackArgs=(writer, envelope))
        pending.addBoth(self._end_transaction)
        return pending

    def _committed(self, stored: object, writer: IMessageWriter, envelope: Envelope) -> None:
        message_id = stored.id if isinstance(stored, StoredMessage) else writer.id
        self._idle_commands = 0
        self._reply(250, "2.0.0", f"Ok: queued as {message_id}")  # the client first, then the log
        try:
            self._log.info(
                "queued {msg_id} from {peer} in SMTP session {session}: {size} bytes, {rcpts} recipients",
                msg_id=message_id,
                peer=self._peer_host,
                session=self.session_id,
                size=self._size,
                rcpts=len(envelope.rcpt_to),
            )
        except Exception:  # noqa: BLE001 - answered already: a second reply would break the client's pipeline
            self._log.failure("logging an accepted message failed in SMTP session {session}", session=self.session_id)

    def _commit_failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, GomailError):
            self._log.warn("spool commit failed in SMTP session {session}: {error}", session=self.session_id, error=error)
            self._rejected(error.category)
            self._reply_error(error)
        else:
            self._log.failure("spool commit failed in SMTP session {session}", failure, session=self.session_id)
            self._rejected("internal")
            if self._metrics is not None:
                self._metrics.errors.labels(category="internal").inc()
            self._reply(451, "4.3.0", "Error: internal error")

    def _end_transaction(self, result: object) -> object:
        self._writer = None
        self._committing = False
        self._reset_transaction()
        return result
