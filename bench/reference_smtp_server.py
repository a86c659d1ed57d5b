"""Reference for bench/smtp_throughput: the least a Twisted SMTP server does.

Answers every command with a fixed reply and discards the message: no
address parsing, no limits, no storage, no parsing, no logging.  What it
reaches on a machine is the ceiling for any SMTP server on Twisted's
reactor there; gomail's own rate is read against it and against Postfix's
smtp-sink (C, same work).

Usage: python bench/reference_smtp_server.py PORT
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

_END = b"\r\n.\r\n"


class Responder(Protocol):
    def connectionMade(self) -> None:
        self.buf = b""
        self.in_data = False
        self.transport.write(b"220 reference ESMTP\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        while True:
            if self.in_data:
                end = self.buf.find(_END)
                if end < 0:
                    self.buf = self.buf[-4:]  # keep what may start the terminator
                    break
                self.buf = self.buf[end + len(_END) :]
                self.in_data = False
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                break
            verb = self.buf[:4].upper()
            self.buf = self.buf[end + 2 :]
            if verb == b"DATA":
                self.in_data = True
                self.buf = b"\r\n" + self.buf  # the terminator's leading CRLF
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            elif verb in (b"EHLO", b"HELO"):
                out.append(b"250-reference\r\n250 PIPELINING\r\n")
            else:
                out.append(b"250 2.0.0 Ok\r\n")
        if out:
            self.transport.write(b"".join(out))  # type: ignore[union-attr]


factory = Factory.forProtocol(Responder)
factory.noisy = False
reactor.listenTCP(int(sys.argv[1]), factory, interface="127.0.0.1")  # type: ignore[attr-defined]
reactor.run()  # type: ignore[attr-defined]
