"""Decoding the DATA stream: end of data, dot-unstuffing and line policies.

RFC 5321 section 4.1.1.4 ends message data with ``<CRLF>.<CRLF>`` only.  A
``.`` line preceded by a bare LF or CR does not end it (the "SMTP smuggling"
attacks of 2023 rely on receivers that accept one), and bare LF and CR are
rejected or normalised to CRLF by policy, like Postfix's
``smtpd_forbid_bare_newline``.  The decoder keeps at most one line's worth of
bytes; longer lines are rejected, wrapped or passed on in pieces.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message is refused at the end of data.

    Attributes:
        code: The basic SMTP reply code.
        enhanced: The enhanced status code.
        text: The reply text.
        category: The error category (``gomail.errors.CATEGORIES``).
    """

    code: int
    enhanced: str
    text: str
    category: str


BARE_LF = Rejection(550, "5.6.11", "Error: bare <LF> received", "validation")
BARE_CR = Rejection(550, "5.6.11", "Error: bare <CR> received", "validation")
LONG_LINE = Rejection(550, "5.6.0", "Error: message line too long", "validation")
HEADER_TOO_LARGE = Rejection(552, "5.3.4", "Error: message header size exceeds limit", "too_large")

_TERMINATOR = b".\r\n"

#: When several problems are found, the reply names the first of these.
_PRIORITY: tuple[Rejection, ...] = (BARE_LF, BARE_CR, LONG_LINE, HEADER_TOO_LARGE)


class DataDecoder:
    """Turns the bytes after ``354`` into message bytes, one chunk at a time.

    Feed it whatever arrives; it returns the message bytes to store and, once
    it has seen the end of data, the bytes that follow (the next commands).
    The result (bytes, end, :attr:`rejection`) does not depend on how the
    stream was cut into chunks.
    """

    def __init__(
        self,
        *,
        max_line_length: int = 1000,
        long_line_policy: str = "reject",
        bare_newline_policy: str = "reject",
        max_header_bytes: int = 1048576,
    ) -> None:
        """Create a decoder for one message.

        Args:
            max_line_length: Longest line in octets, CRLF included.
            long_line_policy: ``reject``, ``wrap`` or ``accept``.
            bare_newline_policy: ``reject`` or ``normalize``.
            max_header_bytes: Largest header section in octets.
        """
        self._limit = max_line_length - 2
        self._long_policy = long_line_policy
        self._normalize = bare_newline_policy == "normalize"
        self._max_header_bytes = max_header_bytes
        self._carry = b""
        self._line_start = True
        self._prev_crlf = True
        self._dropping = False
        self._drop_cr = False
        self._in_headers = True
        self._header_bytes = 0
        self._problems: set[Rejection] = set()
        self.done = False

    @property
    def rejection(self) -> Rejection | None:
        """Why the message must be refused, or ``None``; once set, no more bytes are returned."""
        if not self._problems:
            return None
        return next(p for p in _PRIORITY if p in self._problems)

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Decode the next bytes of the stream.

        Args:
            data: Bytes as they arrived from the client.

        Returns:
            The message bytes decoded from ``data`` (possibly empty), and
            ``None`` while the end of data has not been seen, else the bytes
            after ``<CRLF>.<CRLF>``.
        """
        out: list[bytes] = []
        if self._carry:
            data = self._carry + data
            self._carry = b""
        pos = 0
        size = len(data)
        while pos < size:
            if self._line_start and not self._in_headers and not self._dropping and data[pos : pos + 1] != b".":
                clean = self._clean_lines(data, pos)
                if clean > pos:
                    if not self._problems:
                        out.append(data[pos:clean])
                    self._prev_crlf = True
                    pos = clean
                    continue
            newline = data.find(b"\n", pos)
            if self._dropping:
                segment = data[pos:] if newline < 0 else data[pos:newline]
                self._scan_dropped(segment)
                if newline < 0:
                    self._drop_cr = segment[-1:] == b"\r"
                    break
                self._prev_crlf = segment[-1:] == b"\r" if segment else self._drop_cr
                if not self._prev_crlf and not self._normalize:
                    self._problems.add(BARE_LF)
                self._dropping = False
                self._line_start = True
                pos = newline + 1
                continue
            if newline < 0:
                self._carry = data[pos:]
                if len(self._carry) > self._limit + 2:
                    self._flush_partial(out)
                break
            line = data[pos : newline + 1]
            pos = newline + 1
            if self._line_start and self._prev_crlf and line == _TERMINATOR:
                self.done = True
                return b"".join(out), data[pos:]
            self._complete_line(line, out)
        return b"".join(out), None

    def _clean_lines(self, data: bytes, pos: int) -> int:
        """The end of the run of ordinary lines at ``pos``, or ``pos`` if there is none.

        Ordinary lines end in CRLF, hold no other CR or LF, are not too long
        and do not start with a dot: they pass through unchanged, so a whole
        run of them is checked and copied at C speed instead of line by line.
        """
        dot = data.find(b"\n.", pos)
        end = dot + 1 if dot >= 0 else data.rfind(b"\n", pos) + 1
        if end <= pos:
            return pos
        run = data[pos:end]
        crlf = run.count(b"\r\n")
        if crlf != run.count(b"\n") or crlf != run.count(b"\r"):
            return pos
        if len(run) > self._limit + 2 and max(map(len, run.split(b"\n"))) > self._limit + 1:
            return pos
        return end

    def _count_header(self, first: bytes, prefix: bytes, size: int) -> None:
        """Track the header section, which ends at the first empty or non-header line.

        Args:
            first: The line's first byte (``b""`` for an empty line).
            prefix: The start of the line's content, up to the line limit.
            size: Octets of the line consumed now.
        """
        if self._line_start and (prefix == b"" or (first not in (b" ", b"\t") and b":" not in prefix)):
            self._in_headers = False
            return
        self._header_bytes += size
        if self._header_bytes > self._max_header_bytes:
            self._problems.add(HEADER_TOO_LARGE)

    def _complete_line(self, line: bytes, out: list[bytes]) -> None:
        """Decode one line that ends in LF (its start may have been passed on already)."""
        if self._line_start and line[:1] == b".":
            line = line[1:]
        crlf = line[-2:] == b"\r\n"
        content = line[:-2] if crlf else line[:-1]
        if self._in_headers:
            self._count_header(content[:1], content[: self._limit], len(line))
        bare_cr = b"\r" in content
        if not crlf and not self._normalize:
            self._problems.add(BARE_LF)
        if bare_cr and not self._normalize:
            self._problems.add(BARE_CR)
        long = len(content) > self._limit
        if long and self._long_policy == "reject":
            self._problems.add(LONG_LINE)
        self._prev_crlf = crlf
        self._line_start = True
        if self._problems:
            return
        if crlf and not bare_cr and not long:
            out.append(line)
            return
        if long and self._long_policy == "wrap":
            while len(content) > self._limit:
                out.append(self._normal(content[: self._limit]) + b"\r\n")
                content = content[self._limit :]
        out.append(self._normal(content) + b"\r\n")

    def _flush_partial(self, out: list[bytes]) -> None:
        """Deal with a line longer than the limit before its end has arrived."""
        data = self._carry
        if self._line_start and data[:1] == b".":
            data = data[1:]
        keep = b"\r" if data[-1:] == b"\r" else b""
        if keep:
            data = data[:-1]
        if b"\r" in data and not self._normalize:
            self._problems.add(BARE_CR)
        if self._long_policy == "reject":
            if self._in_headers:
                self._count_header(data[:1], data[: self._limit], len(data))
            self._problems.add(LONG_LINE)
            self._line_start = False
            self._carry = b""
            self._dropping = True
            self._drop_cr = bool(keep)
            return
        if self._long_policy == "wrap":
            emit = (len(data) - 1) // self._limit * self._limit
        else:
            emit = len(data)
        if self._in_headers:
            self._count_header(data[:1], data[: self._limit], emit)
        self._line_start = False
        if not self._problems:
            if self._long_policy == "wrap":
                out.extend(self._normal(data[i : i + self._limit]) + b"\r\n" for i in range(0, emit, self._limit))
            else:
                out.append(self._normal(data))
        self._carry = data[emit:] + keep

    def _scan_dropped(self, segment: bytes) -> None:
        """Look for bare CRs in the dropped part of an over-long line (``segment`` holds no LF)."""
        if self._normalize or not segment:
            return
        if self._drop_cr or b"\r" in segment[:-1]:
            self._problems.add(BARE_CR)
        self._drop_cr = False

    def _normal(self, content: bytes) -> bytes:
        """Content with bare CRs turned into CRLF (only reached under ``normalize``)."""
        return content.replace(b"\r", b"\r\n") if b"\r" in content else content
