"""Tests for gomail.smtp: the ESMTP protocol and its factory."""

from __future__ import annotations

import socket
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL.SSL import Error as SSLError
from prometheus_client import CollectorRegistry
from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport, StringTransportWithDisconnection
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import alsoProvides

from gomail.errors import StorageFailed, Unavailable
from gomail.interfaces import Envelope
from gomail.metrics import GomailMetrics
from gomail.smtp import SMTPFactory, SMTPServerProtocol, SMTPSettings
from tests.unit.smtp_fakes import Decision, FakeLimiter, FakeRecipients, FakeSpool

HOST = "mx.example.com"
PEER = IPv4Address("TCP", "203.0.113.5", 4321)
GREETING = "220 mx.example.com ESMTP gomail"
EHLO_REPLY = [
    "250-mx.example.com",
    "250-PIPELINING",
    "250-SIZE 26214400",
    "250-8BITMIME",
    "250-SMTPUTF8",
    "250-ENHANCEDSTATUSCODES",
    "250 CHUNKING",
]
EPOCH = "Thu, 01 Jan 1970 00:00:00 +0000"
ENVELOPE = b"MAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\n"


def received(
    rcpts: tuple[str, ...] = ("u@example.com",),
    msg_id: str = "MSG0001",
    protocol: str = "ESMTP",
    helo: str = "client.example.org",
    when: str = EPOCH,
    client: str = "203.0.113.5",
) -> bytes:
    """The Received header the server should write first."""
    head = f"Received: from {helo} (unknown [{client}])\r\n\tby mx.example.com (gomail) with {protocol} id {msg_id}"
    if len(rcpts) == 1:
        return f"{head}\r\n\tfor <{rcpts[0]}>; {when}\r\n".encode()
    return f"{head};\r\n\t{when}\r\n".encode()


class Session:
    """One client connection over a StringTransport."""

    def __init__(self, factory: SMTPFactory, peer: Any = PEER, *, wrapped: bool = False, transport: StringTransport | None = None) -> None:
        self.transport = transport if transport is not None else StringTransport(peerAddress=peer)
        proto = factory.buildProtocol(peer)
        assert isinstance(proto, SMTPServerProtocol)
        self.proto = proto
        if not wrapped:
            # Like a TCP connection, whose ``protocol`` is the session; a
            # wrapper (PROXY protocol, TLS) stands between them otherwise.
            self.transport.protocol = proto  # type: ignore[attr-defined]
        proto.makeConnection(self.transport)

    def replies(self) -> list[str]:
        """Reply lines written since the last call."""
        lines = self.transport.value().decode("utf-8").splitlines()
        self.transport.clear()
        return lines

    def send(self, data: bytes) -> list[str]:
        """Feed ``data`` in one piece; the replies it caused."""
        self.proto.dataReceived(data)
        return self.replies()

    def trickle(self, data: bytes) -> list[str]:
        """Feed ``data`` one byte at a time; the replies it caused."""
        for i in range(len(data)):
            self.proto.dataReceived(data[i : i + 1])
        return self.replies()

    def lose(self) -> None:
        """The connection closes."""
        self.proto.connectionLost(Failure(ConnectionDone()))

    @property
    def closing(self) -> bool:
        """Whether the server closed the connection."""
        return bool(self.transport.disconnecting)


class SMTPTestCase(SynchronousTestCase):
    """Builds a factory with fakes; each test may change settings first."""

    limiter: FakeLimiter | None = None

    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = FakeSpool()
        self.registry = CollectorRegistry()
        self.metrics = GomailMetrics(self.registry)
        self.factory = self.make_factory()

    def make_factory(self, **overrides: Any) -> SMTPFactory:
        """A factory with ``HOST`` and the given setting overrides."""
        self.factory = SMTPFactory(
            SMTPSettings(hostname=HOST, **overrides),
            self.spool,
            FakeRecipients(),
            self.clock,
            self.metrics,
            self.limiter,
        )
        return self.factory

    def connect(self, peer: Any = PEER) -> Session:
        """A connected session whose greeting has been checked."""
        session = Session(self.factory, peer)
        self.assertEqual(session.replies(), [GREETING])
        return session

    def ready(self) -> Session:
        """A connected session after EHLO."""
        session = self.connect()
        self.assertEqual(session.send(b"EHLO client.example.org\r\n"), EHLO_REPLY)
        return session

    def metric(self, name: str, **labels: str) -> float | None:
        """A sample value of the registry."""
        return self.registry.get_sample_value(name, labels)


class GreetingAndSimpleCommandTests(SMTPTestCase):
    """Greeting, EHLO/HELO and the commands without a transaction."""

    def test_greeting(self) -> None:
        """The greeting names the configured host and carries no enhanced code."""
        self.connect()

    def test_custom_greeting(self) -> None:
        """The banner text after the hostname is configurable."""
        self.make_factory(greeting="Service ready")
        self.assertEqual(Session(self.factory).replies(), ["220 mx.example.com Service ready"])

    def test_ehlo(self) -> None:
        """EHLO lists every extension, without enhanced codes."""
        self.ready()

    def test_ehlo_size_follows_settings(self) -> None:
        """SIZE advertises the configured limit."""
        self.make_factory(max_message_size=1000)
        session = self.connect()
        self.assertIn("250-SIZE 1000", session.send(b"EHLO x\r\n"))

    def test_helo(self) -> None:
        """HELO answers with the hostname only."""
        self.assertEqual(self.connect().send(b"HELO client.example.org\r\n"), ["250 mx.example.com"])

    def test_hello_needs_a_name(self) -> None:
        """EHLO and HELO without a (printable) name are syntax errors."""
        session = self.connect()
        self.assertEqual(
            session.send(b"EHLO\r\nHELO\r\nEHLO a b\r\n"),
            ["501 5.5.4 Syntax: EHLO hostname", "501 5.5.4 Syntax: HELO hostname", "501 5.5.4 Syntax: EHLO hostname"],
        )

    def test_noop_rset_vrfy_help(self) -> None:
        """NOOP, RSET, VRFY and HELP have fixed answers."""
        session = self.connect()
        self.assertEqual(
            session.send(b"NOOP\r\nNOOP hello\r\nRSET\r\nRSET x\r\nVRFY root\r\nVRFY\r\nHELP\r\n"),
            [
                "250 2.0.0 Ok",
                "250 2.0.0 Ok",
                "250 2.0.0 Ok",
                "501 5.5.4 Syntax: RSET",
                "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery",
                "501 5.5.4 Syntax: VRFY address",
                "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP",
            ],
        )

    def test_quit(self) -> None:
        """QUIT says 221 and closes; later input is ignored."""
        session = self.connect()
        self.assertEqual(session.send(b"QUIT\r\nNOOP\r\n"), ["221 2.0.0 Bye"])
        self.assertTrue(session.closing)
        self.assertEqual(session.send(b"NOOP\r\n"), [])

    def test_unknown_command(self) -> None:
        """Unknown commands, empty lines and bad UTF-8 are 500."""
        session = self.connect()
        self.assertEqual(
            session.send(b"EXPN x\r\nTURN\r\n\r\nNO\xffOP\r\nDO_QUIT\r\n"),
            [
                "500 5.5.1 Error: command not recognized",
                "500 5.5.1 Error: command not recognized",
                "500 5.5.2 Error: bad syntax",
                "500 5.5.2 Error: bad UTF-8 syntax",
                "500 5.5.1 Error: command not recognized",
            ],
        )

    def test_case_insensitive(self) -> None:
        """Command verbs and keywords are case-insensitive."""
        session = self.connect()
        self.assertEqual(
            session.send(b"ehlo x\r\nmail from:<a@b.org>\r\nrcpt to:<u@example.com>\r\n")[-2:],
            ["250 2.1.0 Ok", "250 2.1.5 Ok"],
        )

    def test_bare_lf_command(self) -> None:
        """A command line may end in a bare LF."""
        self.assertEqual(self.connect().send(b"NOOP\nNOOP\r\n"), ["250 2.0.0 Ok", "250 2.0.0 Ok"])

    def test_line_too_long(self) -> None:
        """A command line over 512 octets is 500 5.5.2; the next line is read normally."""
        session = self.connect()
        self.assertEqual(
            session.send(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n"),
            ["500 5.5.2 Error: line too long", "250 2.0.0 Ok"],
        )

    def test_line_length_boundary(self) -> None:
        """510 octets plus CRLF is the longest command line accepted."""
        session = self.connect()
        self.assertEqual(session.send(b"NOOP " + b"x" * 505 + b"\r\n"), ["250 2.0.0 Ok"])
        self.assertEqual(session.send(b"NOOP " + b"x" * 506 + b"\r\n"), ["500 5.5.2 Error: line too long"])

    def test_long_line_in_pieces(self) -> None:
        """An over-long line that arrives in pieces gets one 500 and is skipped."""
        session = self.connect()
        self.assertEqual(session.send(b"x" * 400), [])
        self.assertEqual(session.send(b"x" * 400), ["500 5.5.2 Error: line too long"])
        self.assertEqual(session.send(b"x" * 400), [])
        self.assertEqual(session.send(b"x\r\nNOOP\r\n"), ["250 2.0.0 Ok"])


class MailTests(SMTPTestCase):
    """MAIL FROM and its parameters."""

    def test_mail(self) -> None:
        """A valid MAIL is 250 2.1.0."""
        self.assertEqual(self.ready().send(b"MAIL FROM:<a@b.org>\r\n"), ["250 2.1.0 Ok"])

    def test_null_sender(self) -> None:
        """The null sender is accepted."""
        self.assertEqual(self.ready().send(b"MAIL FROM:<>\r\n"), ["250 2.1.0 Ok"])

    def test_mail_before_hello(self) -> None:
        """MAIL before EHLO/HELO is 503."""
        self.assertEqual(self.connect().send(b"MAIL FROM:<a@b.org>\r\n"), ["503 5.5.1 Error: send HELO/EHLO first"])

    def test_nested_mail(self) -> None:
        """A second MAIL in a transaction is 503."""
        session = self.ready()
        self.assertEqual(
            session.send(b"MAIL FROM:<a@b.org>\r\nMAIL FROM:<c@d.org>\r\n"),
            ["250 2.1.0 Ok", "503 5.5.1 Error: nested MAIL command"],
        )

    def test_mail_syntax(self) -> None:
        """Missing FROM: is 501 5.5.4; a bad path is 501 5.1.7."""
        session = self.ready()
        self.assertEqual(
            session.send(b"MAIL TO:<a@b.org>\r\nMAIL\r\nMAIL FROM:<a b@c.org>\r\nMAIL FROM: <a@b.org>\r\n"),
            [
                "501 5.5.4 Syntax: MAIL FROM:<address>",
                "501 5.5.4 Syntax: MAIL FROM:<address>",
                "501 5.1.7 Bad sender address syntax",
                "250 2.1.0 Ok",
            ],
        )

    def test_size_over_limit(self) -> None:
        """SIZE over the limit is refused before any data."""
        self.make_factory(max_message_size=1000)
        session = self.connect()
        session.send(b"EHLO x\r\n")
        self.assertEqual(
            session.send(b"MAIL FROM:<a@b.org> SIZE=1001\r\nMAIL FROM:<a@b.org> SIZE=1000\r\n"),
            ["552 5.3.4 Message size exceeds fixed limit", "250 2.1.0 Ok"],
        )
        self.assertEqual(self.metric("gomail_messages_rejected_total", transport="smtp", category="too_large"), 1.0)

    def test_size_syntax(self) -> None:
        """SIZE must be a number."""
        session = self.ready()
        self.assertEqual(
            session.send(b"MAIL FROM:<a@b.org> SIZE=ten\r\nMAIL FROM:<a@b.org> SIZE\r\n"),
            ["501 5.5.4 Error: bad SIZE syntax", "501 5.5.4 Error: bad SIZE syntax"],
        )

    def test_body(self) -> None:
        """BODY=7BIT and 8BITMIME are accepted; anything else is 501."""
        session = self.ready()
        self.assertEqual(
            session.send(
                b"MAIL FROM:<a@b.org> BODY=BINARYMIME\r\nMAIL FROM:<a@b.org> BODY=8bitmime\r\nRSET\r\nMAIL FROM:<a@b.org> BODY=7BIT\r\n"
            ),
            ["501 5.5.4 Error: unsupported BODY type", "250 2.1.0 Ok", "250 2.0.0 Ok", "250 2.1.0 Ok"],
        )

    def test_body_in_envelope(self) -> None:
        """The BODY type reaches the envelope."""
        session = self.ready()
        session.send(b"MAIL FROM:<a@b.org> BODY=8BITMIME\r\nRCPT TO:<u@example.com>\r\nDATA\r\nx\r\n.\r\n")
        envelope = self.spool.committed[0].envelope
        assert envelope is not None
        self.assertEqual(envelope.body, "8BITMIME")

    def test_unknown_parameter(self) -> None:
        """Unknown MAIL parameters are 555."""
        self.assertEqual(
            self.ready().send(b"MAIL FROM:<a@b.org> RET=HDRS\r\n"),
            ["555 5.5.4 Unsupported option: RET"],
        )

    def test_smtputf8(self) -> None:
        """With SMTPUTF8, UTF-8 addresses pass and the message is marked UTF8SMTP."""
        session = self.ready()
        self.assertEqual(
            session.send("MAIL FROM:<jöran@bücher.example> SMTPUTF8\r\nRCPT TO:<ñandú@example.com>\r\nDATA\r\nx\r\n.\r\n".encode()),
            ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued as MSG0001"],
        )
        writer = self.spool.committed[0]
        assert writer.envelope is not None
        self.assertTrue(writer.envelope.smtputf8)
        self.assertEqual(writer.envelope.protocol, "UTF8SMTP")
        self.assertEqual(writer.envelope.mail_from, "jöran@bücher.example")
        self.assertTrue(writer.data.startswith(received(rcpts=("ñandú@example.com",), protocol="UTF8SMTP")))

    def test_smtputf8_takes_no_value(self) -> None:
        """SMTPUTF8=x is a syntax error."""
        self.assertEqual(self.ready().send(b"MAIL FROM:<a@b.org> SMTPUTF8=yes\r\n"), ["501 5.5.4 Error: SMTPUTF8 takes no value"])

    def test_utf8_without_smtputf8(self) -> None:
        """UTF-8 addresses without SMTPUTF8 are 553 5.6.7."""
        session = self.ready()
        self.assertEqual(
            session.send("MAIL FROM:<jöran@example.org>\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<ñandú@example.com>\r\n".encode()),
            [
                "553 5.6.7 Error: non-ASCII address requires SMTPUTF8",
                "250 2.1.0 Ok",
                "553 5.6.7 Error: non-ASCII address requires SMTPUTF8",
            ],
        )


class RcptTests(SMTPTestCase):
    """RCPT TO: policy, limits and syntax."""

    def test_rcpt_without_mail(self) -> None:
        """RCPT before MAIL is 503."""
        self.assertEqual(self.ready().send(b"RCPT TO:<u@example.com>\r\n"), ["503 5.5.1 Error: need MAIL command"])

    def test_relay_denied(self) -> None:
        """Recipients outside our domains are 550 5.7.1."""
        session = self.ready()
        self.assertEqual(
            session.send(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<u@elsewhere.org>\r\nRCPT TO:<U@Example.COM>\r\n"),
            ["250 2.1.0 Ok", "550 5.7.1 <u@elsewhere.org>: Relay access denied", "250 2.1.5 Ok"],
        )

    def test_too_many_recipients(self) -> None:
        """Recipients over the limit are 452 4.5.3."""
        self.make_factory(max_recipients=2)
        session = self.connect()
        session.send(b"EHLO x\r\nMAIL FROM:<a@b.org>\r\n")
        self.assertEqual(
            session.send(b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n"),
            ["250 2.1.5 Ok", "250 2.1.5 Ok", "452 4.5.3 Error: too many recipients"],
        )

    def test_rcpt_syntax(self) -> None:
        """RCPT syntax errors, null recipients and parameters are refused."""
        session = self.ready()
        session.send(b"MAIL FROM:<a@b.org>\r\n")
        self.assertEqual(
            session.send(b"RCPT FROM:<u@example.com>\r\nRCPT TO:<>\r\nRCPT TO:<u@example.com> NOTIFY=NEVER\r\n"),
            [
                "501 5.5.4 Syntax: RCPT TO:<address>",
                "501 5.1.3 Bad recipient address syntax",
                "555 5.5.4 Unsupported option: NOTIFY",
            ],
        )

    def test_duplicate_recipient(self) -> None:
        """A recipient given twice is delivered once."""
        session = self.ready()
        session.send(ENVELOPE + b"RCPT TO:<u@example.com>\r\nDATA\r\nx\r\n.\r\n")
        envelope = self.spool.committed[0].envelope
        assert envelope is not None
        self.assertEqual(envelope.rcpt_to, ("u@example.com",))

    def test_postmaster(self) -> None:
        """``<postmaster>`` is accepted when the policy accepts it."""
        session = self.ready()
        self.assertEqual(session.send(b"MAIL FROM:<>\r\nRCPT TO:<postmaster>\r\n"), ["250 2.1.0 Ok", "250 2.1.5 Ok"])


class DataTests(SMTPTestCase):
    """DATA: framing, dot-unstuffing, line policies and limits."""

    def test_data_sequence(self) -> None:
        """DATA needs MAIL and a valid RCPT, and takes no argument."""
        session = self.ready()
        self.assertEqual(
            session.send(b"DATA\r\nMAIL FROM:<a@b.org>\r\nDATA\r\nRCPT TO:<u@elsewhere.org>\r\nDATA\r\nDATA x\r\n"),
            [
                "503 5.5.1 Error: need MAIL command",
                "250 2.1.0 Ok",
                "554 5.5.1 Error: no valid recipients",
                "550 5.7.1 <u@elsewhere.org>: Relay access denied",
                "554 5.5.1 Error: no valid recipients",
                "501 5.5.4 Syntax: DATA",
            ],
        )

    def test_message_stored(self) -> None:
        """A message is stored with a Received header, dot-unstuffed, and 250 names its id."""
        session = self.ready()
        self.assertEqual(session.send(ENVELOPE + b"DATA\r\n"), ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"])
        self.assertEqual(session.send(b"Subject: hi\r\n\r\n..leading dot\r\n..\r\n.\r\n"), ["250 2.0.0 Ok: queued as MSG0001"])
        self.assertEqual(self.spool.committed[0].data, received() + b"Subject: hi\r\n\r\n.leading dot\r\n.\r\n")

    def test_empty_message(self) -> None:
        """A message may be empty."""
        session = self.ready()
        self.assertEqual(session.send(ENVELOPE + b"DATA\r\n.\r\n")[-1], "250 2.0.0 Ok: queued as MSG0001")
        self.assertEqual(self.spool.committed[0].data, received())

    def test_envelope(self) -> None:
        """The envelope holds everything the session learnt."""
        session = self.ready()
        session.send(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\nRCPT TO:<v@example.com>\r\nDATA\r\nx\r\n.\r\n")
        self.assertEqual(
            self.spool.committed[0].envelope,
            Envelope(
                transport="smtp",
                mail_from="a@b.org",
                rcpt_to=("u@example.com", "v@example.com"),
                helo="client.example.org",
                client_address="203.0.113.5",
                client_port=4321,
                body=None,
                smtputf8=False,
                tls=False,
                protocol="ESMTP",
                request_id=session.proto.session_id,
            ),
        )

    def test_received_header_several_recipients(self) -> None:
        """With several recipients the Received header names none, and the date is the clock's."""
        self.clock.advance(1700000000)
        session = self.ready()
        session.send(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\nRCPT TO:<v@example.com>\r\nDATA\r\nx\r\n.\r\n")
        self.assertEqual(
            self.spool.committed[0].data,
            b"Received: from client.example.org (unknown [203.0.113.5])\r\n"
            b"\tby mx.example.com (gomail) with ESMTP id MSG0001;\r\n"
            b"\tTue, 14 Nov 2023 22:13:20 +0000\r\nx\r\n",
        )

    def test_received_header_helo_ipv6(self) -> None:
        """A HELO session over IPv6 is ``with SMTP`` from an ``IPv6:`` literal."""
        session = Session(self.factory, IPv6Address("TCP", "2001:db8::5", 25))
        session.send(b"HELO old.example.org\r\n" + ENVELOPE + b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(
            self.spool.committed[0].data,
            received(protocol="SMTP", helo="old.example.org", client="IPv6:2001:db8::5") + b"x\r\n",
        )

    def test_lf_dot_does_not_end_data(self) -> None:
        """``.`` after a bare LF, or ending in a bare LF, does not end DATA (SMTP smuggling)."""
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\n")
        self.assertEqual(session.send(b"x\r\n.\nMAIL FROM:<evil@b.org>\r\nx\n.\r\nRCPT TO:<u@example.com>\r\n"), [])
        self.assertEqual(session.send(b"\r\n.\r\n"), ["550 5.6.11 Error: bare <LF> received"])
        self.assertEqual(self.spool.committed, [])
        self.assertTrue(self.spool.writers[0].aborted)

    def test_cr_dot_does_not_end_data(self) -> None:
        """``<CR>.<CR>`` does not end DATA either; the bare CR is refused."""
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\n")
        self.assertEqual(session.send(b"x\r.\r\r\n"), [])
        self.assertEqual(session.send(b"\r\n.\r\n"), ["550 5.6.11 Error: bare <CR> received"])

    def test_bare_lf_reported_first(self) -> None:
        """With several problems the reply names the bare LF, whatever came first."""
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\n")
        self.assertEqual(session.send(b"y" * 2000 + b"\r\na\rb\r\nc\n\r\n.\r\n"), ["550 5.6.11 Error: bare <LF> received"])

    def test_bare_newlines_normalized(self) -> None:
        """Under ``normalize`` bare LF and CR become CRLF and the message is accepted."""
        self.make_factory(bare_newline_policy="normalize")
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\n")
        self.assertEqual(session.send(b"a\nb\rc\r\n.\n.\r\n"), [])
        self.assertEqual(session.send(b".\r\n"), ["250 2.0.0 Ok: queued as MSG0001"])
        self.assertEqual(self.spool.committed[0].data, received() + b"a\r\nb\r\nc\r\n\r\n\r\n")

    def test_long_line_rejected(self) -> None:
        """A line over 1000 octets is refused at the end of data by default."""
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\n")
        self.assertEqual(session.send(b"x" * 998 + b"\r\n" + b"y" * 999 + b"\r\n"), [])
        self.assertEqual(session.send(b".\r\nNOOP\r\n"), ["550 5.6.0 Error: message line too long", "250 2.0.0 Ok"])
        self.assertTrue(self.spool.writers[0].aborted)

    def test_long_line_wrapped(self) -> None:
        """Under ``wrap`` a long line is split into lines of 998 octets."""
        self.make_factory(long_line_policy="wrap")
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\n")
        self.assertEqual(session.send(b"x" * 2000 + b"\r\n.\r\n"), ["250 2.0.0 Ok: queued as MSG0001"])
        self.assertEqual(self.spool.committed[0].data, received() + b"x" * 998 + b"\r\n" + b"x" * 998 + b"\r\n" + b"xxxx\r\n")

    def test_long_line_accepted(self) -> None:
        """Under ``accept`` a long line is stored unchanged, even when it arrives in pieces."""
        self.make_factory(long_line_policy="accept")
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\n")
        for _ in range(10):
            session.send(b"z" * 500)
        self.assertEqual(session.send(b"\r\n.\r\n"), ["250 2.0.0 Ok: queued as MSG0001"])
        self.assertEqual(self.spool.committed[0].data, received() + b"z" * 5000 + b"\r\n")

    def test_too_large(self) -> None:
        """Over the size limit the data is read and discarded, then 552."""
        self.make_factory(max_message_size=100)
        session = self.connect()
        session.send(b"EHLO x\r\n" + ENVELOPE + b"DATA\r\n")
        self.assertEqual(session.send(b"a" * 60 + b"\r\n"), [])
        self.assertEqual(session.send(b"b" * 60 + b"\r\n"), [])
        self.assertTrue(self.spool.writers[0].aborted)
        self.assertEqual(session.send(b"c" * 60 + b"\r\n.\r\nNOOP\r\n"), ["552 5.3.4 Error: message too large", "250 2.0.0 Ok"])
        self.assertEqual(self.spool.committed, [])
        self.assertEqual(self.metric("gomail_messages_rejected_total", transport="smtp", category="too_large"), 1.0)

    def test_header_too_large(self) -> None:
        """A header section over the limit is 552."""
        self.make_factory(max_header_bytes=50)
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\n")
        self.assertEqual(
            session.send(b"Subject: " + b"s" * 30 + b"\r\nX-Other: " + b"o" * 30 + b"\r\n\r\nbody\r\n.\r\n"),
            ["552 5.3.4 Error: message header size exceeds limit"],
        )

    def test_transaction_reset_after_message(self) -> None:
        """After a message, RCPT needs a new MAIL and a second message gets the next id."""
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(
            session.send(b"RCPT TO:<u@example.com>\r\n" + ENVELOPE + b"DATA\r\ny\r\n.\r\n"),
            [
                "503 5.5.1 Error: need MAIL command",
                "250 2.1.0 Ok",
                "250 2.1.5 Ok",
                "354 End data with <CR><LF>.<CR><LF>",
                "250 2.0.0 Ok: queued as MSG0002",
            ],
        )

    def test_rset_during_transaction(self) -> None:
        """RSET forgets the transaction."""
        session = self.ready()
        self.assertEqual(session.send(ENVELOPE + b"RSET\r\nDATA\r\n")[-2:], ["250 2.0.0 Ok", "503 5.5.1 Error: need MAIL command"])

    def test_storage_failure_at_commit(self) -> None:
        """A StorageFailed commit is answered with its own codes."""
        self.spool.commit_error = StorageFailed("Error: insufficient system storage")
        session = self.ready()
        self.assertEqual(
            session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\nNOOP\r\n")[-2:],
            ["452 4.3.1 Error: insufficient system storage", "250 2.0.0 Ok"],
        )

    def test_unexpected_failure_at_commit(self) -> None:
        """Any other commit failure is 451 4.3.0 and is logged."""
        self.spool.commit_error = RuntimeError("bug")
        session = self.ready()
        self.assertEqual(session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")[-1], "451 4.3.0 Error: internal error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_spool_refuses_message(self) -> None:
        """When the spool cannot begin a message, DATA is answered with the error."""
        self.spool.begin_error = StorageFailed("Error: insufficient system storage")
        session = self.ready()
        self.assertEqual(session.send(ENVELOPE + b"DATA\r\n")[-1], "452 4.3.1 Error: insufficient system storage")
        self.spool.begin_error = Unavailable("Error: spool unavailable")
        self.assertEqual(session.send(ENVELOPE + b"DATA\r\n")[-1], "451 4.3.2 Error: spool unavailable")

    def test_write_failure(self) -> None:
        """A failing write discards the message and is answered at the end of data."""
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\n")
        self.spool.write_error = StorageFailed("Error: write failed")
        self.assertEqual(session.send(b"x\r\n.\r\n"), ["452 4.3.1 Error: write failed"])
        self.assertTrue(self.spool.writers[0].aborted)

    def test_body_never_logged(self) -> None:
        """Logs never contain message content."""
        session = self.ready()
        with capturedLogs() as events:
            session.send(ENVELOPE + b"DATA\r\nSubject: secret-subject\r\n\r\nsecret-body\r\n.\r\nQUIT\r\n")
            session.lose()
        text = repr(events)
        self.assertNotIn("secret", text)
        self.assertTrue(any("queued" in event.get("log_format", "") for event in events))


class PipeliningTests(SMTPTestCase):
    """Replies in command order, whatever arrives together and whatever is pending."""

    TRANSACTION = (
        b"EHLO client.example.org\r\nMAIL FROM:<a@b.org> SIZE=20\r\nRCPT TO:<u@example.com>\r\n"
        b"RCPT TO:<u@elsewhere.org>\r\nRCPT TO:<v@example.com>\r\nDATA\r\nSubject: x\r\n\r\n..x\r\n.\r\n"
        b"MAIL FROM:<c@d.org>\r\nRCPT TO:<w@example.com>\r\nBDAT 5\r\nhelloBDAT 0 LAST\r\nNOOP\r\nQUIT\r\n"
    )
    TRANSACTION_REPLIES = [
        *EHLO_REPLY,
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "550 5.7.1 <u@elsewhere.org>: Relay access denied",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as MSG0001",
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "250 2.0.0 5 octets received",
        "250 2.0.0 Ok: queued as MSG0002",
        "250 2.0.0 Ok",
        "221 2.0.0 Bye",
    ]

    def test_one_write(self) -> None:
        """A whole session in one write is answered in order."""
        self.assertEqual(self.connect().send(self.TRANSACTION), self.TRANSACTION_REPLIES)
        self.assertEqual(self.spool.committed[0].data, received(rcpts=("u@example.com", "v@example.com")) + b"Subject: x\r\n\r\n.x\r\n")
        self.assertEqual(self.spool.committed[1].data, received(rcpts=("w@example.com",), msg_id="MSG0002") + b"hello")

    def test_one_byte_at_a_time(self) -> None:
        """Feeding one byte at a time gives the same replies and the same messages."""
        self.assertEqual(self.connect().trickle(self.TRANSACTION), self.TRANSACTION_REPLIES)
        self.assertEqual(self.spool.committed[0].data, received(rcpts=("u@example.com", "v@example.com")) + b"Subject: x\r\n\r\n.x\r\n")

    def test_pending_commit_holds_later_replies(self) -> None:
        """While a commit is pending, later commands wait; reading goes on
        until 64 KiB of them pile up, then the socket is paused too."""
        self.make_factory(max_idle_commands=100_000)  # NOOPs are the filler here
        self.spool.auto_commit = False
        session = self.ready()
        self.assertEqual(
            session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\nNOOP\r\nMAIL FROM:<c@d.org>\r\n"),
            ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"],
        )
        self.assertEqual(session.transport.producerState, "producing")
        self.assertEqual(session.send(b"RCPT TO:<u@example.com>\r\n"), [])
        self.assertEqual(session.send(b"NOOP\r\n" * 12000), [])
        self.assertEqual(session.transport.producerState, "paused")
        self.spool.fire_commit()
        replies = session.replies()
        self.assertEqual(replies[:4], ["250 2.0.0 Ok: queued as MSG0001", "250 2.0.0 Ok", "250 2.1.0 Ok", "250 2.1.5 Ok"])
        self.assertEqual(replies[4:], ["250 2.0.0 Ok"] * 12000)
        self.assertEqual(session.transport.producerState, "producing")

    def test_pending_commit_failure(self) -> None:
        """A commit that fails later is answered in its place."""
        self.spool.auto_commit = False
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\nNOOP\r\n")
        self.spool.fail_commit(StorageFailed("Error: disk full"))
        self.assertEqual(session.replies(), ["452 4.3.1 Error: disk full", "250 2.0.0 Ok"])

    def test_replies_of_one_pass_go_out_together(self) -> None:
        """Pipelined commands read together are answered with one send."""
        session = self.ready()
        sent: list[bytes] = []
        session.proto._send = sent.append  # type: ignore[method-assign]
        session.send(ENVELOPE + b"RCPT TO:<v@example.com>\r\nDATA\r\n")
        self.assertEqual(sent, [b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"])

    def commit_behind_a_wrapper(self, after: bytes) -> Session:
        """A wrapped session whose message (then ``after``) waits for its commit,
        with reading stopped meanwhile; the commit then fires."""
        self.spool.auto_commit = False
        session = Session(self.factory, wrapped=True)
        session.replies()
        session.send(b"EHLO client.example.org\r\n" + ENVELOPE + b"DATA\r\nx\r\n.\r\n" + after)
        self.assertEqual(session.transport.producerState, "paused")
        self.spool.fire_commit()
        return session

    def test_wrapped_connection_stops_reading_during_a_commit(self) -> None:
        """Behind a wrapper (PROXY protocol, TLS) a half-close would not reach the
        session, so a pending commit stops reading at once, as before."""
        session = self.commit_behind_a_wrapper(b"")
        self.assertEqual(session.replies(), ["250 2.0.0 Ok: queued as MSG0001"])
        self.assertEqual(session.transport.producerState, "producing")

    def test_pipelined_quit_behind_a_wrapper_keeps_reading_off(self) -> None:
        """A QUIT answered after a commit leaves reading off: the client's EOF must
        not end the connection before the replies are out (behind TLS it would
        drop them, and the client would send the message again)."""
        session = self.commit_behind_a_wrapper(b"QUIT\r\n")
        self.assertEqual(session.replies(), ["250 2.0.0 Ok: queued as MSG0001", "221 2.0.0 Bye"])
        self.assertTrue(session.closing)
        self.assertEqual(session.transport.producerState, "paused")

    def test_bug_while_answering_a_commit(self) -> None:
        """A bug after the commit gets 451 4.3.0; the transaction ends and the session goes on."""
        session = self.ready()

        def broken(*args: object) -> None:
            raise RuntimeError("bug")

        self.patch(session.proto, "_committed", broken)
        replies = session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\nNOOP\r\nMAIL FROM:<c@d.org>\r\n")
        self.assertEqual(replies[3:], ["451 4.3.0 Error: internal error", "250 2.0.0 Ok", "250 2.1.0 Ok"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_pending_bdat_commit(self) -> None:
        """BDAT LAST with a pending commit holds the next replies too."""
        self.spool.auto_commit = False
        session = self.ready()
        self.assertEqual(session.send(ENVELOPE + b"BDAT 3 LAST\r\nabcNOOP\r\n"), ["250 2.1.0 Ok", "250 2.1.5 Ok"])
        self.spool.fire_commit()
        self.assertEqual(session.replies(), ["250 2.0.0 Ok: queued as MSG0001", "250 2.0.0 Ok"])

    def test_backpressure(self) -> None:
        """When the writer pushes back, input is paused until it catches up."""
        self.spool.backpressure = True
        session = self.ready()
        self.assertEqual(session.send(ENVELOPE + b"DATA\r\n"), ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"])
        self.assertEqual(session.transport.producerState, "paused")
        self.assertEqual(session.send(b"line one\r\n.\r\nNOOP\r\n"), [])
        self.spool.release_writes()
        self.assertEqual(session.replies(), [])
        self.assertEqual(session.transport.producerState, "paused")
        self.assertEqual(self.spool.writers[0].envelope, None)
        self.spool.release_writes()
        self.assertEqual(session.replies(), ["250 2.0.0 Ok: queued as MSG0001", "250 2.0.0 Ok"])
        self.assertEqual(session.transport.producerState, "producing")
        self.assertEqual(self.spool.committed[0].data, received() + b"line one\r\n")

    def test_too_much_pipelined_input(self) -> None:
        """Input piling up while paused is bounded: the session is closed."""
        self.spool.auto_commit = False
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(session.send(b"NOOP\r\n" * 200000), ["421 4.7.0 mx.example.com Error: too much pipelined input"])
        self.assertTrue(session.closing)


class RealSocketTests(SMTPTestCase):
    """Over a real TCP connection."""

    def test_no_delay_and_immediate_greeting(self) -> None:
        """Nagle is off (a reply never waits for the client's delayed ACK) and the
        greeting is on the wire before the reactor runs."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        client = socket.create_connection(listener.getsockname(), timeout=10)
        self.addCleanup(client.close)
        server, peer = listener.accept()
        self.addCleanup(server.close)
        proto = self.factory.buildProtocol(IPv4Address("TCP", *peer))
        transport = tcp.Server(server, proto, peer, None, 1, MemoryReactor())  # type: ignore[arg-type]
        proto.makeConnection(transport)
        self.assertEqual(server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        self.assertEqual(client.recv(1000), (GREETING + "\r\n").encode())
        proto.connectionLost(Failure(ConnectionDone()))


class FakeTLSConnection:
    """What ``getHandle()`` returns once TLS is on: an OpenSSL connection."""

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return "TLS_AES_128_GCM_SHA256"

    def get_cipher_bits(self) -> int:
        return 128


class TLSCapableTransport(StringTransport):
    """A StringTransport that can start TLS, as a TCP connection can (ITLSTransport)."""

    TLS = False

    def __init__(self, *, tls_from_start: bool = False) -> None:
        super().__init__(peerAddress=PEER)
        self.started_with: object | None = None
        self.written_before_tls = b""
        if tls_from_start:
            self._become_tls()

    def startTLS(self, options: object) -> None:
        self.started_with = options
        self.written_before_tls = self.value()
        self._become_tls()

    def _become_tls(self) -> None:
        self.TLS = True
        alsoProvides(self, ISSLTransport)

    def getHandle(self) -> FakeTLSConnection:
        return FakeTLSConnection()


TLS_OPTIONS = object()  # the factory passes them on to startTLS untouched
EHLO_TLS_REPLY = EHLO_REPLY[:3] + ["250-STARTTLS"] + EHLO_REPLY[3:]


class StartTLSTests(SMTPTestCase):
    """STARTTLS (RFC 3207), offered when the factory has TLS options."""

    def setUp(self) -> None:
        super().setUp()
        self.factory.tls = TLS_OPTIONS  # type: ignore[assignment]

    def tls_session(self, **kwargs: Any) -> Session:
        session = Session(self.factory, transport=TLSCapableTransport(**kwargs))
        self.assertEqual(session.replies(), [GREETING])
        return session

    def started(self) -> Session:
        """A session after EHLO, STARTTLS and the handshake."""
        session = self.tls_session()
        self.assertEqual(session.send(b"EHLO client.example.org\r\n"), EHLO_TLS_REPLY)
        self.assertEqual(session.send(b"STARTTLS\r\n"), ["220 2.0.0 Ready to start TLS"])
        session.proto.handshakeCompleted()
        return session

    def test_offered_in_ehlo_and_help(self) -> None:
        """With a certificate, EHLO lists STARTTLS and HELP names it."""
        session = self.tls_session()
        self.assertEqual(session.send(b"EHLO client.example.org\r\n"), EHLO_TLS_REPLY)
        self.assertEqual(session.send(b"HELP\r\n"), ["214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS"])

    def test_not_offered_without_certificate(self) -> None:
        """Without TLS options STARTTLS is neither listed nor accepted (502, as Postfix)."""
        self.factory.tls = None
        session = self.tls_session()
        self.assertEqual(session.send(b"EHLO client.example.org\r\n"), EHLO_REPLY)
        self.assertEqual(session.send(b"STARTTLS\r\n"), ["502 5.5.1 Error: command not implemented"])
        self.assertIsNone(session.transport.started_with)  # type: ignore[attr-defined]

    def test_not_offered_where_the_transport_cannot(self) -> None:
        """A transport without startTLS (a UNIX socket, a wrapper) is never offered TLS."""
        session = self.ready()  # a plain StringTransport
        self.assertEqual(session.send(b"STARTTLS\r\n"), ["502 5.5.1 Error: command not implemented"])

    def test_starttls(self) -> None:
        """220 goes out in clear text, then TLS starts with the factory's options."""
        session = self.started()
        transport = session.transport
        self.assertIs(transport.started_with, TLS_OPTIONS)  # type: ignore[attr-defined]
        self.assertEqual(transport.written_before_tls, b"220 2.0.0 Ready to start TLS\r\n")  # type: ignore[attr-defined]
        self.assertEqual(self.metric("gomail_smtp_replies_total", command="STARTTLS", code="220"), 1.0)

    def test_session_starts_over(self) -> None:
        """After STARTTLS the client must greet again; TLS is no longer offered."""
        session = self.started()
        self.assertEqual(
            session.send(b"MAIL FROM:<a@b.org>\r\nEHLO client.example.org\r\nSTARTTLS\r\n"),
            ["503 5.5.1 Error: send HELO/EHLO first"] + EHLO_REPLY + ["503 5.5.1 Error: TLS already active"],
        )

    def test_pipelined_commands_after_starttls_are_discarded(self) -> None:
        """Commands sent behind STARTTLS in clear text never run (CVE-2011-0411)."""
        session = self.tls_session()
        session.send(b"EHLO client.example.org\r\n")
        with capturedLogs() as events:
            replies = session.send(b"STARTTLS\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.com>\r\n")
        self.assertEqual(replies, ["220 2.0.0 Ready to start TLS"])
        self.assertIn("46 octets sent behind STARTTLS discarded", [e.get("log_format", "").format(**e) for e in events][-1])
        session.proto.handshakeCompleted()
        self.assertEqual(session.send(b"EHLO client.example.org\r\n" + ENVELOPE), EHLO_REPLY + ["250 2.1.0 Ok", "250 2.1.5 Ok"])

    def test_sequence_and_syntax(self) -> None:
        """STARTTLS takes no argument, needs EHLO and no transaction in progress."""
        session = self.tls_session()
        self.assertEqual(session.send(b"STARTTLS\r\n"), ["503 5.5.1 Error: send EHLO first"])
        self.assertEqual(session.send(b"HELO client.example.org\r\nSTARTTLS\r\n"), ["250 mx.example.com", "503 5.5.1 Error: send EHLO first"])
        session.send(b"EHLO client.example.org\r\n")
        self.assertEqual(session.send(b"STARTTLS now\r\n"), ["501 5.5.4 Syntax: STARTTLS"])
        self.assertEqual(session.send(b"MAIL FROM:<a@b.org>\r\nSTARTTLS\r\n"), ["250 2.1.0 Ok", "503 5.5.1 Error: MAIL transaction in progress"])
        self.assertIsNone(session.transport.started_with)  # type: ignore[attr-defined]

    def test_message_over_tls(self) -> None:
        """The Received header says ESMTPS and names the TLS version and cipher; the envelope says tls."""
        session = self.started()
        session.send(b"EHLO client.example.org\r\n" + ENVELOPE + b"DATA\r\nx\r\n.\r\n")
        committed = self.spool.committed[0]
        self.assertEqual(
            committed.data,
            b"Received: from client.example.org (unknown [203.0.113.5])\r\n"
            b"\t(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256 (128/128 bits))\r\n"
            b"\tby mx.example.com (gomail) with ESMTPS id MSG0001\r\n"
            b"\tfor <u@example.com>; " + EPOCH.encode() + b"\r\nx\r\n",
        )
        self.assertTrue(committed.envelope.tls)
        self.assertEqual(committed.envelope.protocol, "ESMTPS")

    def test_smtputf8_over_tls(self) -> None:
        """SMTPUTF8 over TLS is UTF8SMTPS (RFC 6531)."""
        session = self.started()
        session.send(b"EHLO client.example.org\r\nMAIL FROM:<a@b.org> SMTPUTF8\r\nRCPT TO:<u@example.com>\r\nDATA\r\nx\r\n.\r\n")
        self.assertEqual(self.spool.committed[0].envelope.protocol, "UTF8SMTPS")

    def test_tls_from_the_start(self) -> None:
        """On a TLS listener (ssl: endpoint) the session is TLS already: no STARTTLS, ESMTPS."""
        session = self.tls_session(tls_from_start=True)
        self.assertEqual(session.send(b"EHLO client.example.org\r\n"), EHLO_REPLY)
        self.assertEqual(session.send(b"STARTTLS\r\n"), ["503 5.5.1 Error: TLS already active"])
        session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(self.spool.committed[0].envelope.protocol, "ESMTPS")

    def test_stalled_handshake_is_aborted_after_the_idle_timeout(self) -> None:
        """A client that asks for TLS and never handshakes: its 421 waits for the
        handshake in the TLS layer, so the close's bound aborts the connection."""
        session = self.tls_session()
        session.send(b"EHLO client.example.org\r\nSTARTTLS\r\n")
        self.clock.advance(300)
        self.assertTrue(session.closing)
        self.assertFalse(session.transport.disconnected)
        self.clock.advance(5)
        self.assertTrue(session.transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_first_data_over_tls_completes_the_handshake(self) -> None:
        """Behind a PROXY-protocol wrapper the TLS layer cannot tell the session its
        handshake is done; the first bytes read over TLS do."""
        session = self.tls_session()
        session.send(b"EHLO client.example.org\r\nSTARTTLS\r\n")
        session.send(b"EHLO client.example.org\r\n" + ENVELOPE + b"DATA\r\nx\r\n.\r\n")
        self.assertIn(b"\t(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256 (128/128 bits))\r\n", self.spool.committed[0].data)
        session.proto.connectionLost(Failure(SSLError([("SSL routines", "", "bad record mac")])))
        self.assertIsNone(self.metric("gomail_smtp_sessions_total", result="tls_failed"))

    def test_failed_handshake(self) -> None:
        """A handshake that fails ends the session as tls_failed, logged."""
        session = self.tls_session()
        session.send(b"EHLO client.example.org\r\nSTARTTLS\r\n")
        with capturedLogs() as events:
            session.proto.connectionLost(Failure(SSLError([("SSL routines", "", "no shared cipher")])))
        self.assertEqual(self.metric("gomail_smtp_sessions_total", result="tls_failed"), 1.0)
        self.assertTrue(any("TLS handshake failed" in e.get("log_format", "") for e in events))

    def test_lost_after_handshake_is_not_a_tls_failure(self) -> None:
        """A session that drops after a good handshake is just lost."""
        session = self.started()
        session.proto.connectionLost(Failure(SSLError([("SSL routines", "", "unexpected eof")])))
        self.assertIsNone(self.metric("gomail_smtp_sessions_total", result="tls_failed"))
        self.assertEqual(self.metric("gomail_smtp_sessions_total", result="lost"), 1.0)


class CloseBoundTests(SMTPTestCase):
    """Every close is bounded in time, whether or not the client reads."""

    def test_a_client_that_never_reads_is_cut_off(self) -> None:
        """loseConnection waits for the replies to drain; after the grace period the connection is aborted."""
        session = self.ready()
        session.send(b"QUIT\r\n")
        self.assertTrue(session.closing)
        self.clock.advance(4.9)
        self.assertFalse(session.transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(session.transport.disconnected)

    def test_closed_in_time_cancels_the_bound(self) -> None:
        """A connection that closes normally leaves no timer behind."""
        session = self.ready()
        session.send(b"QUIT\r\n")
        session.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ProducerTests(SMTPTestCase):
    """pauseProducing/resumeProducing (IPushProducer): a producer pause stops reading."""

    def test_pause_holds_input_and_resume_answers_it(self) -> None:
        session = self.ready()
        session.proto.pauseProducing()
        self.assertEqual(session.transport.producerState, "paused")
        self.assertEqual(session.send(b"NOOP\r\nNOOP\r\n"), [])
        session.proto.resumeProducing()
        self.assertEqual(session.replies(), ["250 2.0.0 Ok", "250 2.0.0 Ok"])
        self.assertEqual(session.transport.producerState, "producing")

    def test_a_producer_pause_outlasts_a_commit(self) -> None:
        """Reading stays off while the producer pause holds, even after a commit ends."""
        self.spool.auto_commit = False
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\nNOOP\r\n")
        session.proto.pauseProducing()
        self.spool.fire_commit()
        self.assertEqual(session.replies()[-1], "250 2.0.0 Ok: queued as MSG0001")
        self.assertEqual(session.transport.producerState, "paused")
        session.proto.resumeProducing()
        self.assertEqual(session.replies(), ["250 2.0.0 Ok"])
        self.assertEqual(session.transport.producerState, "producing")


class HalfCloseTests(SMTPTestCase):
    """A client that shuts down its sending side still gets its replies."""

    def test_pending_commit_answered_before_close(self) -> None:
        """Half-closed with a commit pending: 250 and 221 go out, then the close."""
        self.spool.auto_commit = False
        session = self.ready()
        self.assertEqual(
            session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\nQUIT\r\n"),
            ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"],
        )
        session.proto.readConnectionLost()
        self.assertFalse(session.closing)
        self.spool.fire_commit()
        self.assertEqual(session.replies(), ["250 2.0.0 Ok: queued as MSG0001", "221 2.0.0 Bye"])
        self.assertTrue(session.closing)

    def test_without_quit(self) -> None:
        """Everything sent is answered, then the server closes by itself."""
        self.spool.auto_commit = False
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\nNOOP\r\n")
        session.proto.readConnectionLost()
        self.spool.fire_commit()
        self.assertEqual(session.replies(), ["250 2.0.0 Ok: queued as MSG0001", "250 2.0.0 Ok"])
        self.assertTrue(session.closing)

    def test_inside_data(self) -> None:
        """Half-closed in the middle of a message: nothing is stored, the connection closes."""
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\npartial line")
        session.proto.readConnectionLost()
        self.assertTrue(session.closing)
        self.assertTrue(self.spool.writers[0].aborted)
        self.assertEqual(self.spool.committed, [])

    def test_idle(self) -> None:
        """Half-closed with nothing pending: closed at once, timers cancelled but
        the bound on the close itself."""
        session = self.ready()
        session.proto.readConnectionLost()
        self.assertTrue(session.closing)
        self.assertEqual([call.func.__name__ for call in self.clock.getDelayedCalls()], ["_abort"])  # type: ignore[attr-defined]
        session.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BdatTests(SMTPTestCase):
    """BDAT (CHUNKING, RFC 3030)."""

    def test_chunks(self) -> None:
        """Chunks are stored raw, answered one by one, and LAST commits."""
        session = self.ready()
        session.send(ENVELOPE)
        self.assertEqual(session.send(b"BDAT 7\r\nab\r\n.\r\n"), ["250 2.0.0 7 octets received"])
        self.assertEqual(session.send(b"BDAT 3\r\n"), [])
        self.assertEqual(session.send(b"c\nd"), ["250 2.0.0 3 octets received"])
        self.assertEqual(session.send(b"BDAT 4 LAST\r\n\r\rEF"), ["250 2.0.0 Ok: queued as MSG0001"])
        self.assertEqual(self.spool.committed[0].data, received() + b"ab\r\n.\r\nc\nd\r\rEF")

    def test_pipelined_chunks(self) -> None:
        """Commands after a chunk in the same write are processed after it."""
        session = self.ready()
        self.assertEqual(
            session.send(ENVELOPE + b"BDAT 9\r\nNOOP\r\nabcBDAT 6 LAST\r\nRSET\r\nNOOP\r\n"),
            [
                "250 2.1.0 Ok",
                "250 2.1.5 Ok",
                "250 2.0.0 9 octets received",
                "250 2.0.0 Ok: queued as MSG0001",
                "250 2.0.0 Ok",
            ],
        )
        self.assertEqual(self.spool.committed[0].data, received() + b"NOOP\r\nabcRSET\r\n")

    def test_zero_last(self) -> None:
        """``BDAT 0 LAST`` ends a message."""
        session = self.ready()
        self.assertEqual(
            session.send(ENVELOPE + b"BDAT 2\r\nhiBDAT 0 LAST\r\n")[-2:],
            ["250 2.0.0 2 octets received", "250 2.0.0 Ok: queued as MSG0001"],
        )
        self.assertEqual(self.spool.committed[0].data, received() + b"hi")

    def test_without_mail(self) -> None:
        """BDAT without MAIL is 503, and its octets are still consumed."""
        session = self.ready()
        self.assertEqual(session.send(b"BDAT 6\r\nNOOP\r\nNOOP\r\n"), ["503 5.5.1 Error: need MAIL command", "250 2.0.0 Ok"])

    def test_without_recipients(self) -> None:
        """BDAT without a valid RCPT is 554, and its octets are still consumed."""
        session = self.ready()
        self.assertEqual(
            session.send(b"MAIL FROM:<a@b.org>\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n"),
            ["250 2.1.0 Ok", "554 5.5.1 Error: no valid recipients", "250 2.0.0 Ok"],
        )
        self.assertEqual(self.spool.writers, [])

    def test_syntax(self) -> None:
        """A malformed BDAT is 501."""
        session = self.ready()
        self.assertEqual(
            session.send(b"BDAT\r\nBDAT x\r\nBDAT 5 FIRST\r\nBDAT -1\r\n"),
            ["501 5.5.4 Syntax: BDAT count [LAST]"] * 4,
        )

    def test_data_after_bdat(self) -> None:
        """DATA after BDAT in one transaction is 503; the transaction goes on."""
        session = self.ready()
        self.assertEqual(
            session.send(ENVELOPE + b"BDAT 2\r\nabDATA\r\nRCPT TO:<v@example.com>\r\nBDAT 1 LAST\r\nc")[2:],
            [
                "250 2.0.0 2 octets received",
                "503 5.5.1 Error: DATA after BDAT",
                "503 5.5.1 Error: RCPT after BDAT",
                "250 2.0.0 Ok: queued as MSG0001",
            ],
        )
        self.assertEqual(self.spool.committed[0].data, received() + b"abc")

    def test_too_large(self) -> None:
        """Over the size limit chunks are consumed and discarded; LAST gets 552."""
        self.make_factory(max_message_size=10)
        session = self.ready_small()
        self.assertEqual(
            session.send(ENVELOPE + b"BDAT 8\r\n12345678BDAT 8\r\n12345678BDAT 1 LAST\r\n9NOOP\r\n")[2:],
            [
                "250 2.0.0 8 octets received",
                "250 2.0.0 8 octets received",
                "552 5.3.4 Error: message too large",
                "250 2.0.0 Ok",
            ],
        )
        self.assertTrue(self.spool.writers[0].aborted)
        self.assertEqual(self.spool.committed, [])

    def ready_small(self) -> Session:
        """A session after EHLO with a factory whose SIZE differs from the default."""
        session = self.connect()
        session.send(b"EHLO client.example.org\r\n")
        return session

    def test_rset_between_chunks(self) -> None:
        """RSET between chunks aborts the message."""
        session = self.ready()
        self.assertEqual(
            session.send(ENVELOPE + b"BDAT 2\r\nabRSET\r\nBDAT 1 LAST\r\nx")[2:],
            ["250 2.0.0 2 octets received", "250 2.0.0 Ok", "503 5.5.1 Error: need MAIL command"],
        )
        self.assertTrue(self.spool.writers[0].aborted)

    def test_large_chunk_in_pieces(self) -> None:
        """A chunk may arrive in many pieces and is written as it comes."""
        session = self.ready()
        session.send(ENVELOPE + b"BDAT 30000 LAST\r\n")
        for _ in range(2):
            self.assertEqual(session.send(b"x" * 10000), [])
        self.assertEqual(session.send(b"x" * 10000), ["250 2.0.0 Ok: queued as MSG0001"])
        self.assertEqual(self.spool.committed[0].data, received() + b"x" * 30000)


class TimeoutTests(SMTPTestCase):
    """Idle and data-transfer timeouts on the injected clock."""

    def test_idle(self) -> None:
        """A silent client is told 421 4.4.2 after idle_timeout and disconnected."""
        session = self.connect()
        self.clock.advance(299)
        self.assertEqual(session.replies(), [])
        self.clock.advance(1)
        self.assertEqual(session.replies(), ["421 4.4.2 mx.example.com Error: timeout exceeded"])
        self.assertTrue(session.closing)
        session.lose()
        self.assertEqual(self.metric("gomail_smtp_sessions_total", result="timeout"), 1.0)

    def test_activity_resets_idle(self) -> None:
        """Any input restarts the idle timer."""
        session = self.connect()
        self.clock.advance(200)
        session.send(b"NO")
        self.clock.advance(200)
        self.assertEqual(session.send(b"OP\r\n"), ["250 2.0.0 Ok"])
        self.clock.advance(299)
        self.assertEqual(session.replies(), [])
        self.clock.advance(1)
        self.assertEqual(session.replies(), ["421 4.4.2 mx.example.com Error: timeout exceeded"])

    def test_idle_in_data(self) -> None:
        """A client that stalls in DATA times out and the message is discarded."""
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\npartial")
        self.clock.advance(300)
        self.assertEqual(session.replies(), ["421 4.4.2 mx.example.com Error: timeout exceeded"])
        self.assertTrue(self.spool.writers[0].aborted)

    def test_data_transfer_limit(self) -> None:
        """One DATA transfer may not take longer than data_timeout, however busy."""
        self.make_factory(data_timeout=60)
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\n")
        for _ in range(5):
            self.clock.advance(10)
            self.assertEqual(session.send(b"more\r\n"), [])
        self.clock.advance(10)
        self.assertEqual(session.replies(), ["421 4.4.2 mx.example.com Error: timeout exceeded"])
        self.assertTrue(self.spool.writers[0].aborted)

    def test_bdat_transfer_limit(self) -> None:
        """The transfer limit covers all chunks of a BDAT message."""
        self.make_factory(data_timeout=60)
        session = self.ready()
        session.send(ENVELOPE + b"BDAT 1\r\na")
        self.clock.advance(30)
        session.send(b"BDAT 1\r\nb")
        self.clock.advance(30)
        self.assertEqual(session.replies(), ["421 4.4.2 mx.example.com Error: timeout exceeded"])

    def test_data_timer_stops(self) -> None:
        """After the message only the idle timer runs."""
        self.make_factory(data_timeout=60)
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(100)
        self.assertEqual(session.send(b"NOOP\r\n"), ["250 2.0.0 Ok"])

    def test_no_idle_timeout_while_server_busy(self) -> None:
        """The idle timer does not run while a reply is pending on the server."""
        self.spool.auto_commit = False
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")
        session.replies()
        self.clock.advance(1000)
        self.assertEqual(session.replies(), [])
        self.spool.fire_commit()
        self.assertEqual(session.replies(), ["250 2.0.0 Ok: queued as MSG0001"])
        self.clock.advance(300)
        self.assertEqual(session.replies(), ["421 4.4.2 mx.example.com Error: timeout exceeded"])

    def test_timers_cancelled_on_close(self) -> None:
        """Connection loss cancels every timer."""
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\n")
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        session.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.spool.writers[0].aborted)


class JunkTests(SMTPTestCase):
    """The limit on bad commands."""

    def test_too_many_errors(self) -> None:
        """After junk_command_limit bad commands the session is closed with 421."""
        self.make_factory(junk_command_limit=3)
        session = self.connect()
        self.assertEqual(
            session.send(b"FOO\r\nNOOP\r\nMAIL FROM:<a@b.org>\r\nBAR\r\nNOOP\r\n"),
            [
                "500 5.5.1 Error: command not recognized",
                "250 2.0.0 Ok",
                "503 5.5.1 Error: send HELO/EHLO first",
                "500 5.5.1 Error: command not recognized",
                "421 4.7.0 mx.example.com Error: too many errors",
            ],
        )
        self.assertTrue(session.closing)
        session.lose()
        self.assertEqual(self.metric("gomail_smtp_sessions_total", result="error"), 1.0)

    def test_default_limit(self) -> None:
        """The default limit is 20."""
        session = self.connect()
        lines = session.send(b"X\r\n" * 25)
        self.assertEqual(lines, ["500 5.5.1 Error: command not recognized"] * 20 + ["421 4.7.0 mx.example.com Error: too many errors"])


class IdleCommandTests(SMTPTestCase):
    """NOOP, RSET, VRFY and HELP past max_idle_commands count as bad commands (Postfix's
    smtpd_junk_command_limit): a client cannot hold a session for ever without sending mail."""

    def test_past_the_limit_each_counts_as_an_error(self) -> None:
        """Each still gets its own reply; the bad-command limit then closes the session."""
        self.make_factory(max_idle_commands=3, junk_command_limit=2)
        session = self.ready()  # EHLO is the first
        self.assertEqual(
            [reply[:3] for reply in session.send(b"NOOP\r\nRSET\r\nHELP\r\nVRFY someone\r\nNOOP\r\n")],
            ["250", "250", "214", "252", "421"],
        )
        self.assertTrue(session.closing)

    def test_an_accepted_message_starts_the_count_again(self) -> None:
        """The count is per message: a session that keeps delivering mail is never closed for it."""
        self.make_factory(max_idle_commands=3, junk_command_limit=1)
        session = self.ready()
        for _ in range(3):
            replies = session.send(b"NOOP\r\nRSET\r\n" + ENVELOPE + b"DATA\r\nx\r\n.\r\n")
            self.assertEqual(replies[-1][:25], "250 2.0.0 Ok: queued as M")
        self.assertFalse(session.closing)
        self.assertEqual(session.send(b"NOOP\r\n" * 4)[-1], "421 4.7.0 mx.example.com Error: too many errors")

    def test_greetings_count_too(self) -> None:
        """EHLO and HELO move no mail either: a client greeting in a loop is closed."""
        self.make_factory(max_idle_commands=2, junk_command_limit=1)
        session = self.connect()
        replies = session.send(b"EHLO a.example\r\nHELO b.example\r\nEHLO c.example\r\n")
        self.assertEqual(replies[-2:], ["250 CHUNKING", "421 4.7.0 mx.example.com Error: too many errors"])

    def test_default_allows_a_hundred(self) -> None:
        """By default 100 such commands pass (EHLO is the first); the limit of 20 bad commands follows."""
        session = self.ready()
        replies = session.send(b"NOOP\r\n" * 125)
        self.assertEqual(replies, ["250 2.0.0 Ok"] * 119 + ["421 4.7.0 mx.example.com Error: too many errors"])


class ConnectionLimitTests(SMTPTestCase):
    """Session caps and the limiter."""

    def test_max_sessions(self) -> None:
        """Sessions over max_sessions are refused at connect with 421 4.7.0."""
        self.make_factory(max_sessions=2)
        first = self.connect()
        self.connect()
        third = Session(self.factory)
        self.assertEqual(third.replies(), ["421 4.7.0 mx.example.com Error: too many connections"])
        self.assertTrue(third.closing)
        self.assertEqual(self.factory.active_sessions, 3)
        third.lose()
        first.lose()
        self.assertEqual(self.factory.active_sessions, 1)
        self.connect()
        self.assertEqual(self.metric("gomail_smtp_sessions_total", result="rejected"), 1.0)

    def test_limiter_refuses_connection(self) -> None:
        """A refused connection gets 421 4.7.0 and is not released later."""
        limiter = FakeLimiter(connect=Decision(False, retry_at=60.0, rule="smtp_connection_rate"))
        self.limiter = limiter
        self.make_factory()
        session = Session(self.factory)
        self.assertEqual(session.replies(), ["421 4.7.0 mx.example.com Error: rate limit exceeded, try again later"])
        session.lose()
        self.assertEqual(limiter.calls, [("connect", ("203.0.113.5",))])

    def test_limiter_admits_and_releases(self) -> None:
        """An admitted session is released with smtp_disconnect."""
        limiter = FakeLimiter()
        self.limiter = limiter
        self.make_factory()
        self.connect().lose()
        self.assertEqual(limiter.calls, [("connect", ("203.0.113.5",)), ("disconnect", ("203.0.113.5",))])

    def test_async_connect_decision(self) -> None:
        """A Deferred connect decision delays the greeting, and input waits for it."""
        decision: Deferred[Decision] = Deferred()
        self.limiter = FakeLimiter(connect=decision)
        self.make_factory()
        session = Session(self.factory)
        self.assertEqual(session.send(b"NOOP\r\n"), [])
        decision.callback(Decision(True))
        self.assertEqual(session.replies(), [GREETING, "250 2.0.0 Ok"])

    def test_limiter_refuses_mail(self) -> None:
        """A refused MAIL is 450 4.7.1 with the wait in seconds."""
        limiter = FakeLimiter(message=Decision(False, retry_at=29.2, rule="sender"))
        self.limiter = limiter
        self.make_factory()
        session = self.ready()
        self.assertEqual(
            session.send(b"MAIL FROM:<a@B.org>\r\nRCPT TO:<u@example.com>\r\n"),
            ["450 4.7.1 Error: rate limit exceeded, try again in 30 seconds", "503 5.5.1 Error: need MAIL command"],
        )
        self.assertEqual(limiter.calls[-1], ("message", ("203.0.113.5", "b.org")))
        self.assertEqual(self.metric("gomail_messages_rejected_total", transport="smtp", category="rate_limited"), 1.0)

    def test_null_sender_domain(self) -> None:
        """The null sender has no domain for the limiter."""
        limiter = FakeLimiter()
        self.limiter = limiter
        self.make_factory()
        self.ready().send(b"MAIL FROM:<>\r\n")
        self.assertEqual(limiter.calls[-1], ("message", ("203.0.113.5", None)))

    def test_limiter_refuses_recipient(self) -> None:
        """A refused RCPT is 450 4.7.1; the transaction goes on."""
        limiter = FakeLimiter(recipient=Decision(False, retry_at=float("inf")))
        self.limiter = limiter
        self.make_factory()
        session = self.ready()
        self.assertEqual(
            session.send(ENVELOPE + b"DATA\r\n"),
            [
                "250 2.1.0 Ok",
                "450 4.7.1 Error: rate limit exceeded, try again in 3600 seconds",
                "554 5.5.1 Error: no valid recipients",
            ],
        )
        self.assertEqual(limiter.calls[-1], ("recipient", ("203.0.113.5", "example.com")))

    def test_tarpit(self) -> None:
        """Refusals wait tarpit_seconds on the clock; later commands wait too."""
        self.limiter = FakeLimiter(message=Decision(False, retry_at=10.0))
        self.make_factory(tarpit_seconds=2.0)
        session = self.ready()
        self.assertEqual(session.send(b"MAIL FROM:<a@b.org>\r\nNOOP\r\n"), [])
        self.clock.advance(1.5)
        self.assertEqual(session.replies(), [])
        self.clock.advance(0.5)
        self.assertEqual(session.replies(), ["450 4.7.1 Error: rate limit exceeded, try again in 8 seconds", "250 2.0.0 Ok"])

    def test_tarpit_cancelled_on_close(self) -> None:
        """A client that leaves during the tarpit leaves no timer behind."""
        self.limiter = FakeLimiter(message=Decision(False, retry_at=10.0))
        self.make_factory(tarpit_seconds=2.0)
        session = self.ready()
        session.send(b"MAIL FROM:<a@b.org>\r\n")
        session.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_async_decisions_keep_order(self) -> None:
        """Pending limiter decisions hold later replies in order."""
        pending: Deferred[Decision] = Deferred()
        self.limiter = FakeLimiter(recipient=pending)
        self.make_factory()
        session = self.ready()
        self.assertEqual(session.send(ENVELOPE + b"NOOP\r\n"), ["250 2.1.0 Ok"])
        pending.callback(Decision(True))
        self.assertEqual(session.replies(), ["250 2.1.5 Ok", "250 2.0.0 Ok"])


class ShutdownTests(SMTPTestCase):
    """begin_shutdown, wait_drained and close_all."""

    SHUTDOWN = "421 4.3.2 mx.example.com Service shutting down"

    def test_idle_session_refused(self) -> None:
        """After begin_shutdown an idle session gets 421 4.3.2 on its next command."""
        session = self.ready()
        self.factory.begin_shutdown()
        self.assertEqual(session.send(b"MAIL FROM:<a@b.org>\r\nNOOP\r\n"), [self.SHUTDOWN])
        self.assertTrue(session.closing)

    def test_quit_still_answered(self) -> None:
        """QUIT still gets 221 during shutdown."""
        session = self.ready()
        self.factory.begin_shutdown()
        self.assertEqual(session.send(b"QUIT\r\n"), ["221 2.0.0 Bye"])

    def test_transaction_may_finish(self) -> None:
        """A transaction in progress finishes; the next command gets 421."""
        session = self.ready()
        session.send(b"MAIL FROM:<a@b.org>\r\n")
        self.factory.begin_shutdown()
        self.assertEqual(
            session.send(b"RCPT TO:<u@example.com>\r\nDATA\r\nx\r\n.\r\nMAIL FROM:<a@b.org>\r\n"),
            ["250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued as MSG0001", self.SHUTDOWN],
        )

    def test_data_in_progress_may_finish(self) -> None:
        """A message being received when shutdown begins is still accepted."""
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\nhalf")
        self.factory.begin_shutdown()
        self.assertEqual(session.send(b" done\r\n.\r\nNOOP\r\n"), ["250 2.0.0 Ok: queued as MSG0001", self.SHUTDOWN])

    def test_new_connection_refused(self) -> None:
        """New connections get 421 4.3.2 at connect."""
        self.factory.begin_shutdown()
        session = Session(self.factory)
        self.assertEqual(session.replies(), [self.SHUTDOWN])
        self.assertTrue(session.closing)
        self.assertTrue(self.factory.shutting_down)

    def test_wait_drained(self) -> None:
        """wait_drained fires once the last session is gone."""
        self.assertIsNone(self.successResultOf(self.factory.wait_drained()))
        first, second = self.connect(), self.connect()
        drained = self.factory.wait_drained()
        first.lose()
        self.assertNoResult(drained)
        second.lose()
        self.assertIsNone(self.successResultOf(drained))
        self.assertEqual(self.factory.active_sessions, 0)

    def test_close_all(self) -> None:
        """close_all says 421 4.3.2, closes, aborts what does not close, and discards partial messages."""
        idle = self.ready()
        busy = self.ready()
        busy.send(ENVELOPE + b"DATA\r\nhalf")
        busy.replies()
        self.factory.begin_shutdown()
        self.factory.close_all()
        self.assertEqual(idle.replies(), [self.SHUTDOWN])
        self.assertEqual(busy.replies(), [self.SHUTDOWN])
        self.assertTrue(idle.closing and busy.closing)
        self.assertTrue(self.spool.writers[0].aborted)
        idle.lose()
        self.clock.advance(5)
        self.assertTrue(busy.transport.disconnected)
        busy.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.metric("gomail_smtp_sessions_total", result="shutdown"), 2.0)

    def test_close_all_aborts_a_closing_session_without_leaking_its_timer(self) -> None:
        """A session already closing (QUIT answered, client not gone) is aborted at
        once, and its close's own timer goes with it."""
        session = self.ready()
        session.send(b"QUIT\r\n")
        self.factory.close_all()
        self.assertTrue(session.transport.disconnected)
        session.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_all_keeps_committing_message(self) -> None:
        """close_all does not abort a message whose commit is in progress."""
        self.spool.auto_commit = False
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")
        self.factory.close_all()
        self.assertFalse(self.spool.writers[0].aborted)
        self.spool.fire_commit()
        self.assertEqual(session.replies()[-1], self.SHUTDOWN)
        session.lose()

    def test_wait_drained_cancel(self) -> None:
        """A cancelled wait_drained is forgotten."""
        session = self.connect()
        drained = self.factory.wait_drained()
        drained.cancel()
        self.failureResultOf(drained)
        session.lose()


class MetricsTests(SMTPTestCase):
    """Metrics of sessions, replies and messages."""

    def test_metrics(self) -> None:
        """A session with one message updates every SMTP metric."""
        session = self.ready()
        self.assertEqual(self.metric("gomail_smtp_sessions_active"), 1.0)
        session.send(ENVELOPE + b"DATA\r\n" + b"x" * 500 + b"\r\n.\r\n")
        session.send(ENVELOPE + b"DATA\r\nx\n.\r\n\r\n.\r\nQUIT\r\n")
        session.lose()
        self.assertEqual(self.metric("gomail_smtp_sessions_active"), 0.0)
        self.assertEqual(self.metric("gomail_smtp_sessions_total", result="ok"), 1.0)
        self.assertEqual(self.metric("gomail_smtp_replies_total", command="CONNECT", code="220"), 1.0)
        self.assertEqual(self.metric("gomail_smtp_replies_total", command="EHLO", code="250"), 1.0)
        self.assertEqual(self.metric("gomail_smtp_replies_total", command="DATA", code="354"), 2.0)
        self.assertEqual(self.metric("gomail_smtp_replies_total", command="DATA", code="250"), 1.0)
        self.assertEqual(self.metric("gomail_smtp_replies_total", command="DATA", code="550"), 1.0)
        self.assertEqual(self.metric("gomail_smtp_replies_total", command="QUIT", code="221"), 1.0)
        self.assertEqual(self.metric("gomail_messages_rejected_total", transport="smtp", category="validation"), 1.0)
        # Accepted messages are counted by the spool, for both transports.
        self.assertIsNone(self.metric("gomail_messages_received_total", transport="smtp"))

    def test_unknown_command_label(self) -> None:
        """Unknown verbs share one label."""
        self.connect().send(b"FOO\r\nBAR\r\n")
        self.assertEqual(self.metric("gomail_smtp_replies_total", command="UNKNOWN", code="500"), 2.0)

    def test_without_metrics(self) -> None:
        """The protocol works without metrics."""
        self.metrics = None  # type: ignore[assignment]
        self.factory = SMTPFactory(SMTPSettings(hostname=HOST), self.spool, FakeRecipients(), self.clock)
        session = self.ready()
        self.assertEqual(session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")[-1], "250 2.0.0 Ok: queued as MSG0001")
        session.lose()


class SettingsTests(SynchronousTestCase):
    """SMTPSettings validates itself."""

    def test_defaults(self) -> None:
        """Defaults follow the design's limits."""
        settings = SMTPSettings()
        self.assertEqual((settings.hostname, settings.max_message_size, settings.max_recipients), ("localhost", 26214400, 100))
        self.assertEqual(settings.banner, "localhost ESMTP gomail")

    def test_bad_values(self) -> None:
        """Unknown policies and impossible limits are refused."""
        for bad in (
            {"long_line_policy": "truncate"},
            {"bare_newline_policy": "accept"},
            {"hostname": "two words"},
            {"max_recipients": 0},
            {"idle_timeout": 0},
            {"tarpit_seconds": -1},
            {"max_line_length": 10},
            {"greeting": "a\r\nb"},
        ):
            with self.assertRaises(ValueError):
                SMTPSettings(**bad)  # type: ignore[arg-type]


_TOKENS = st.one_of(
    st.sampled_from(
        [
            b"EHLO client.example.org\r\n",
            b"HELO x\r\n",
            b"MAIL FROM:<a@b.org>\r\n",
            b"MAIL FROM:<> SIZE=10 BODY=8BITMIME\r\n",
            b"RCPT TO:<u@example.com>\r\n",
            b"RCPT TO:<u@elsewhere.org>\r\n",
            b"DATA\r\n",
            b"RSET\r\n",
            b"NOOP\r\n",
            b"VRFY x\r\n",
            b"HELP\r\n",
            b"\r\n.\r\n",
            b".\r\n",
            b".\n",
            b"\n.\r\n",
            b"..x\r\n",
            b"Subject: x\r\n",
            b"\r\n",
            b"\r",
            b"\n",
        ]
    ),
    st.binary(max_size=40),
    st.integers(400, 1200).map(lambda n: b"y" * n + b"\r\n"),
    st.tuples(st.integers(0, 40), st.booleans(), st.binary(max_size=40)).map(
        lambda t: b"BDAT %d%s\r\n" % (t[0], b" LAST" if t[1] else b"") + (t[2] + b"z" * 40)[: t[0]]
    ),
)


class PropertyTests(SMTPTestCase):
    """Arbitrary input never breaks a session."""

    def run_stream(self, stream: bytes, cuts: list[int]) -> tuple[list[str], list[bytes]]:
        """Feed ``stream`` cut at ``cuts``, end any message, then QUIT; the replies and stored messages."""
        self.spool = FakeSpool()
        self.make_factory(junk_command_limit=1000)
        session = Session(self.factory)
        previous = 0
        for cut in [*sorted(set(cuts)), len(stream)]:
            session.proto.dataReceived(stream[previous:cut])
            previous = max(previous, cut)
        if session.proto.input_mode == "data":
            session.proto.dataReceived(b"\r\n.\r\n")
        elif session.proto.input_mode == "bdat":
            session.proto.dataReceived(b"z" * session.proto.bdat_remaining)
        session.proto.dataReceived(b"\r\nQUIT\r\n")
        lines = session.replies()
        session.lose()
        return lines, [writer.data for writer in self.spool.committed]

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_TOKENS, max_size=30).map(b"".join), st.lists(st.integers(0, 2000), max_size=20))
    def test_arbitrary_streams(self, stream: bytes, cuts: list[int]) -> None:
        """Any stream in any split gives the same well-formed replies and ends with 221."""
        whole, stored = self.run_stream(stream, [])
        split, stored_split = self.run_stream(stream, cuts)
        self.assertEqual(whole, split)
        self.assertEqual(stored, stored_split)
        self.assertEqual(whole[-1], "221 2.0.0 Bye")
        for line in whole:
            self.assertRegex(line, r"^[2-5][0-9][0-9][ -]")
            self.assertNotIn("4.3.0", line)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(_TOKENS, max_size=30).map(b"".join))
    def test_junk_limit_or_quit(self, stream: bytes) -> None:
        """With the default junk limit, a session either answers QUIT or was closed with 421."""
        self.spool = FakeSpool()
        self.make_factory()
        session = Session(self.factory)
        session.proto.dataReceived(stream)
        if session.proto.input_mode == "data":
            session.proto.dataReceived(b"\r\n.\r\n")
        elif session.proto.input_mode == "bdat":
            session.proto.dataReceived(b"z" * session.proto.bdat_remaining)
        session.proto.dataReceived(b"\r\nQUIT\r\n")
        lines = session.replies()
        if session.closing and lines[-1].startswith("421"):
            self.assertEqual(lines[-1], "421 4.7.0 mx.example.com Error: too many errors")
        else:
            self.assertEqual(lines[-1], "221 2.0.0 Bye")


class RobustnessTests(SMTPTestCase):
    """Failures of collaborators and of the transport."""

    def test_limiter_raises_at_connect(self) -> None:
        """A limiter that raises at connect gives 421 4.3.0 and a logged error."""
        limiter = FakeLimiter()
        limiter.smtp_connect = lambda address: 1 / 0  # type: ignore[method-assign]
        self.limiter = limiter
        self.make_factory()
        session = Session(self.factory)
        self.assertEqual(session.replies(), ["421 4.3.0 mx.example.com Error: internal error"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_async_connect_decision_fails(self) -> None:
        """A failed asynchronous connect decision gives 421 4.3.0."""
        decision: Deferred[Decision] = Deferred()
        self.limiter = FakeLimiter(connect=decision)
        self.make_factory()
        session = Session(self.factory)
        decision.errback(RuntimeError("limiter down"))
        self.assertEqual(session.replies(), ["421 4.3.0 mx.example.com Error: internal error"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_limiter_raises_at_mail(self) -> None:
        """A limiter that raises at MAIL gives 451 4.3.0; the session goes on."""
        limiter = FakeLimiter()
        limiter.smtp_message = lambda address, domain: 1 / 0  # type: ignore[method-assign]
        self.limiter = limiter
        self.make_factory()
        session = self.ready()
        self.assertEqual(session.send(b"MAIL FROM:<a@b.org>\r\nNOOP\r\n"), ["451 4.3.0 Error: internal error", "250 2.0.0 Ok"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_async_limiter_failure_at_rcpt(self) -> None:
        """A failed asynchronous RCPT decision gives 451 4.3.0 in its place."""
        pending: Deferred[Decision] = Deferred()
        self.limiter = FakeLimiter(recipient=pending)
        self.make_factory()
        session = self.ready()
        session.send(ENVELOPE + b"NOOP\r\n")
        pending.errback(RuntimeError("limiter down"))
        self.assertEqual(session.replies(), ["451 4.3.0 Error: internal error", "250 2.0.0 Ok"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_connection_lost_during_quit(self) -> None:
        """A transport that reports the loss at once (inside loseConnection) is fine."""
        transport = StringTransportWithDisconnection(peerAddress=PEER)
        proto = self.factory.buildProtocol(PEER)
        transport.protocol = proto
        proto.makeConnection(transport)
        proto.dataReceived(b"EHLO x\r\n" + ENVELOPE + b"DATA\r\nx\r\n.\r\nQUIT\r\nNOOP\r\n")
        self.assertEqual(transport.value().decode().splitlines()[-2:], ["250 2.0.0 Ok: queued as MSG0001", "221 2.0.0 Bye"])
        self.assertEqual(self.factory.active_sessions, 0)

    def test_connection_lost_with_pending_commit(self) -> None:
        """A commit that finishes after the client left is still stored and nothing is written."""
        self.spool.auto_commit = False
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\n")
        session.replies()
        session.lose()
        self.spool.fire_commit()
        self.assertEqual(session.replies(), [])
        self.assertEqual(len(self.spool.committed), 1)
        self.assertFalse(self.spool.writers[0].aborted)

    def test_client_leaves_mid_data(self) -> None:
        """A client that leaves in the middle of DATA leaves nothing behind."""
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\nhalf a message")
        session.lose()
        self.assertTrue(self.spool.writers[0].aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.metric("gomail_smtp_sessions_total", result="lost"), 1.0)

    def test_unix_socket_peer(self) -> None:
        """A peer without an IP address is ``unknown`` in the Received header."""
        session = Session(self.factory, UNIXAddress(None))
        session.send(b"EHLO x\r\n" + ENVELOPE + b"DATA\r\nx\r\n.\r\n")
        self.assertTrue(self.spool.committed[0].data.startswith(b"Received: from x (unknown)\r\n"))

    def test_bug_in_data_handling(self) -> None:
        """An unexpected exception while reading input closes the session with 421 4.3.0."""
        session = self.ready()
        session.send(ENVELOPE + b"DATA\r\n")
        session.proto._data_received = lambda data: 1 / 0  # type: ignore[method-assign]
        self.assertEqual(session.send(b"x\r\n.\r\n"), ["421 4.3.0 mx.example.com Error: internal error"])
        self.assertTrue(session.closing)
        self.assertTrue(self.spool.writers[0].aborted)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_header_write_fails(self) -> None:
        """When the first write fails, DATA is refused instead of answered with 354."""
        self.spool.write_error = StorageFailed("Error: disk full")
        session = self.ready()
        self.assertEqual(session.send(ENVELOPE + b"DATA\r\nNOOP\r\n")[2:], ["452 4.3.1 Error: disk full", "250 2.0.0 Ok"])
        self.assertTrue(self.spool.writers[0].aborted)

    def test_write_bug(self) -> None:
        """A write that raises anything else is 451 4.3.0 at the end of data, logged."""
        session = self.ready()
        session.send(ENVELOPE + b"BDAT 1\r\na")
        self.spool.write_error = RuntimeError("bug")
        self.assertEqual(session.send(b"BDAT 1 LAST\r\nb"), ["451 4.3.0 Error: internal error"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_pushed_back_write_fails(self) -> None:
        """A write whose back-pressure Deferred fails refuses the message at its end."""
        self.spool.backpressure = True
        session = self.ready()
        self.assertEqual(
            session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\nNOOP\r\n"),
            ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"],
        )
        self.spool.write_waits.pop(0).errback(StorageFailed("Error: disk full"))
        self.assertEqual(session.replies(), ["452 4.3.1 Error: disk full", "250 2.0.0 Ok"])
        self.assertTrue(self.spool.writers[0].aborted)

    def test_commit_unavailable(self) -> None:
        """A commit refused with Unavailable closes the session with 421."""
        self.spool.commit_error = Unavailable("Service shutting down")
        session = self.ready()
        self.assertEqual(session.send(ENVELOPE + b"DATA\r\nx\r\n.\r\nNOOP\r\n")[-1], "421 4.3.2 mx.example.com Service shutting down")
        self.assertTrue(session.closing)
