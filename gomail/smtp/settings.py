"""Limits and policies of the SMTP receiver."""

from __future__ import annotations

from dataclasses import dataclass

LONG_LINE_POLICIES: tuple[str, ...] = ("reject", "wrap", "accept")
BARE_NEWLINE_POLICIES: tuple[str, ...] = ("reject", "normalize")


@dataclass(frozen=True, slots=True)
class SMTPSettings:
    """What one SMTP listener allows; defaults close to Postfix's.

    Attributes:
        hostname: Our name in the greeting, replies and ``Received:`` headers.
        greeting: Banner text after the hostname (default ``ESMTP gomail``).
        max_message_size: Largest message in octets (advertised in ``SIZE``).
        max_recipients: Recipients accepted per transaction.
        max_line_length: Longest command line in octets, CRLF included
            (RFC 5321 section 4.5.3.1.4).
        max_data_line_length: Longest message line in octets, CRLF included.
        long_line_policy: What to do with longer message lines: ``reject``
            (``550 5.6.0`` at the end of data), ``wrap`` (split them) or
            ``accept`` (store them unchanged).
        bare_newline_policy: What to do with a bare LF or CR in message data:
            ``reject`` (``550 5.6.11`` at the end of data, like Postfix's
            ``smtpd_forbid_bare_newline``) or ``normalize`` (to CRLF).
        idle_timeout: Seconds to wait for the client's next input.
        data_timeout: Seconds one DATA or BDAT transfer may take in total.
        junk_command_limit: Bad commands tolerated before the session is closed.
        max_idle_commands: NOOP, RSET, VRFY, HELP, HELO and EHLO allowed between
            two accepted messages; past it each one also counts as a bad
            command (Postfix's ``smtpd_junk_command_limit``), so a client
            cannot hold a session for ever without sending mail.
        max_sessions: Concurrent sessions for the whole listener.
        max_header_bytes: Largest header section of a DATA message.
        tarpit_seconds: Delay before a rate-limit refusal of MAIL or RCPT.
    """

    hostname: str = "localhost"
    greeting: str | None = None
    max_message_size: int = 26214400
    max_recipients: int = 100
    max_line_length: int = 512
    max_data_line_length: int = 1000
    long_line_policy: str = "reject"
    bare_newline_policy: str = "reject"
    idle_timeout: float = 300
    data_timeout: float = 600
    junk_command_limit: int = 20
    max_idle_commands: int = 100
    max_sessions: int = 1000
    max_header_bytes: int = 1048576
    tarpit_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not self.hostname or any(c.isspace() for c in self.hostname):
            raise ValueError(f"hostname must be one non-empty word, not {self.hostname!r}")
        if self.greeting is not None and ("\r" in self.greeting or "\n" in self.greeting):
            raise ValueError("greeting must be a single line")
        if self.long_line_policy not in LONG_LINE_POLICIES:
            raise ValueError(f"long_line_policy must be one of {LONG_LINE_POLICIES}, not {self.long_line_policy!r}")
        if self.bare_newline_policy not in BARE_NEWLINE_POLICIES:
            raise ValueError(f"bare_newline_policy must be one of {BARE_NEWLINE_POLICIES}, not {self.bare_newline_policy!r}")
        if self.max_line_length < 64:
            raise ValueError("max_line_length must be at least 64")
        if self.max_data_line_length < 3:
            raise ValueError("max_data_line_length must be at least 3")
        for name in ("max_message_size", "max_recipients", "junk_command_limit", "max_idle_commands", "max_sessions", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in ("idle_timeout", "data_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.tarpit_seconds < 0:
            raise ValueError("tarpit_seconds must not be negative")

    @property
    def banner(self) -> str:
        """The text of the ``220`` greeting."""
        return f"{self.hostname} {self.greeting if self.greeting is not None else 'ESMTP gomail'}"
