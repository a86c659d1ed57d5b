"""References for bench/smtp_throughput: the least a Twisted SMTP server does.

Default: answers every command with a fixed reply and discards the message:
no address parsing, no limits, no storage, no parsing, no logging.  What it
reaches on a machine is the ceiling for any SMTP server on Twisted's
reactor there.

With ``--journal PATH``: the same, but durable the way gomail is.  Each
message's bytes are appended to one file by a committer thread, one
``fdatasync`` per batch (group commit across sessions), and the ``250``
goes out only after the sync.  That is the ceiling for any SMTP server on
Twisted that stores what it accepts; gomail's own rate is read against
both and against Postfix's smtp-sink (C, discards).

Usage: python bench/reference_smtp_server.py PORT [--journal PATH]
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

_END = b"\r\n.\r\n"


class Journal:
    """Group commit: a thread appends every waiting message, syncs once, then answers them all."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._more = threading.Condition()
        self._waiting: list[tuple[bytes, Callable[[], None]]] = []
        threading.Thread(target=self._run, name="journal", daemon=True).start()

    def append(self, data: bytes, done: Callable[[], None]) -> None:
        with self._more:
            self._waiting.append((data, done))
            self._more.notify()

    def _run(self) -> None:
        while True:
            with self._more:
                while not self._waiting:
                    self._more.wait()
                batch, self._waiting = self._waiting, []
            os.write(self._fd, b"".join(data for data, _ in batch))
            os.fdatasync(self._fd)
            reactor.callFromThread(_answer, [done for _, done in batch])  # type: ignore[attr-defined]


def _answer(callbacks: list[Callable[[], None]]) -> None:
    for done in callbacks:
        done()


class Responder(Protocol):
    journal: Journal | None = None

    def connectionMade(self) -> None:
        self.buf = b""
        self.in_data = False
        self.body: list[bytes] = []
        self.committing = False
        self.transport.write(b"220 reference ESMTP\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        while not self.committing:
            if self.in_data:
                end = self.buf.find(_END)
                if end < 0:
                    if self.journal is not None:
                        self.body.append(self.buf[:-4])
                    self.buf = self.buf[-4:]  # keep what may start the terminator
                    break
                self.in_data = False
                if self.journal is not None:
                    self.body.append(self.buf[:end])
                    self.buf = self.buf[end + len(_END) :]
                    self.committing = True  # later commands wait for the sync, in order
                    self.journal.append(b"".join(self.body), self.committed)
                    self.body = []
                    break
                self.buf = self.buf[end + len(_END) :]
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

    def committed(self) -> None:
        self.committing = False
        self.transport.write(b"250 2.0.0 Ok: queued\r\n")  # type: ignore[union-attr]
        if self.buf:
            self.dataReceived(b"")  # pipelined commands that arrived meanwhile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("--journal", help="append every message here, fdatasync per batch, before the 250")
    args = parser.parse_args()
    if args.journal:
        Responder.journal = Journal(args.journal)
    factory = Factory.forProtocol(Responder)
    factory.noisy = False
    reactor.listenTCP(args.port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
