"""Tests for gomail.smtp.data: end of data, dot-unstuffing and line policies."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from gomail.smtp.data import BARE_CR, BARE_LF, HEADER_TOO_LARGE, LONG_LINE, DataDecoder, Rejection

_PRIORITY = (BARE_LF, BARE_CR, LONG_LINE)


def reference(stream: bytes, limit: int, long_policy: str, normalize: bool) -> tuple[bytes, bytes | None, Rejection | None]:
    """A slow, obviously line-by-line decoder of a whole stream (no header limit)."""
    out: list[bytes] = []
    problems: set[Rejection] = set()
    prev_crlf = True
    pos = 0
    while True:
        newline = stream.find(b"\n", pos)
        if newline < 0:
            return b"".join(out), None, None
        line = stream[pos : newline + 1]
        pos = newline + 1
        if prev_crlf and line == b".\r\n":
            rejection = next((p for p in _PRIORITY if p in problems), None)
            return b"".join(out), stream[pos:], rejection
        if line.startswith(b"."):
            line = line[1:]
        crlf = line.endswith(b"\r\n")
        content = line[:-2] if crlf else line[:-1]
        if not crlf and not normalize:
            problems.add(BARE_LF)
        if b"\r" in content and not normalize:
            problems.add(BARE_CR)
        long = len(content) > limit
        if long and long_policy == "reject":
            problems.add(LONG_LINE)
        prev_crlf = crlf
        if problems:
            continue
        pieces = [content]
        if long and long_policy == "wrap":
            pieces = [content[i : i + limit] for i in range(0, len(content), limit)]
        for piece in pieces:
            out.append(piece.replace(b"\r", b"\r\n") + b"\r\n")


def decode(stream: bytes, cuts: list[int], **options: object) -> tuple[bytes, bytes | None, Rejection | None]:
    """Feed ``stream`` to a DataDecoder, cut at ``cuts``."""
    decoder = DataDecoder(**options)  # type: ignore[arg-type]
    out: list[bytes] = []
    previous = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        if cut < previous:
            continue
        data, rest = decoder.feed(stream[previous:cut])
        out.append(data)
        previous = cut
        if rest is not None:
            return b"".join(out), rest + stream[previous:], decoder.rejection
    return b"".join(out), None, decoder.rejection


class DecoderTests(SynchronousTestCase):
    """Examples of what the decoder does."""

    def test_end_and_rest(self) -> None:
        """``<CRLF>.<CRLF>`` ends the data and what follows is returned."""
        decoder = DataDecoder()
        self.assertEqual(decoder.feed(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"), (b"Subject: x\r\n\r\nbody\r\n", b"QUIT\r\n"))
        self.assertTrue(decoder.done)
        self.assertIsNone(decoder.rejection)

    def test_immediate_end(self) -> None:
        """A dot right after DATA ends an empty message."""
        self.assertEqual(DataDecoder().feed(b".\r\n"), (b"", b""))

    def test_dot_unstuffing(self) -> None:
        """One leading dot is removed from every other line."""
        self.assertEqual(DataDecoder().feed(b"..\r\n...x\r\n.y\r\n.\r\n"), (b".\r\n..x\r\ny\r\n", b""))

    def test_split_terminator(self) -> None:
        """The terminator may be split anywhere."""
        decoder = DataDecoder()
        self.assertEqual(decoder.feed(b"a\r"), (b"", None))
        self.assertEqual(decoder.feed(b"\n."), (b"a\r\n", None))
        self.assertEqual(decoder.feed(b"\r"), (b"", None))
        self.assertEqual(decoder.feed(b"\nX"), (b"", b"X"))

    def test_smuggling_variants(self) -> None:
        """No variant with a bare CR or LF ends the data."""
        for stream in (b"a\n.\nb\r\n", b"a\n.\r\nb\r\n", b"a\r.\r\nb\r\n", b"a\r\n.\nb\r\n", b"a\r\n.\r b\r\n"):
            self.assertEqual(DataDecoder(bare_newline_policy="normalize").feed(stream)[1], None, stream)

    def test_bare_lf_rejected(self) -> None:
        """A bare LF is a rejection under the default policy."""
        decoder = DataDecoder()
        decoder.feed(b"a\nb\r\n")
        self.assertEqual(decoder.rejection, BARE_LF)

    def test_header_limit(self) -> None:
        """A header section over the limit is a rejection; the body does not count."""
        decoder = DataDecoder(max_header_bytes=30)
        decoder.feed(b"A: 1234567890\r\n\r\n" + b"body\r\n" * 100)
        self.assertIsNone(decoder.rejection)
        decoder = DataDecoder(max_header_bytes=30)
        decoder.feed(b"A: 1234567890\r\nB: 1234567890\r\n C\r\n")
        self.assertEqual(decoder.rejection, HEADER_TOO_LARGE)

    def test_non_header_line_ends_headers(self) -> None:
        """A line without a colon starts the body."""
        decoder = DataDecoder(max_header_bytes=30)
        decoder.feed(b"no header here\r\n" + b"A: 1234567890\r\n" * 10)
        self.assertIsNone(decoder.rejection)

    def test_bare_cr_in_dropped_part(self) -> None:
        """A bare CR in the part of a long line that is dropped is still found."""
        decoder = DataDecoder(max_line_length=20)
        decoder.feed(b"x" * 30)
        self.assertEqual(decoder.rejection, LONG_LINE)
        decoder.feed(b"a\rb\r\n.\r\n")
        self.assertEqual(decoder.rejection, BARE_CR)
        self.assertTrue(decoder.done)

    def test_cr_at_end_of_dropped_chunk(self) -> None:
        """A CR at the end of a dropped chunk is bare only if no LF follows."""
        decoder = DataDecoder(max_line_length=20)
        decoder.feed(b"x" * 30 + b"\r")
        decoder.feed(b"y\r\n")
        self.assertEqual(decoder.rejection, BARE_CR)
        decoder = DataDecoder(max_line_length=20)
        decoder.feed(b"x" * 30 + b"\r")
        self.assertEqual(decoder.feed(b"\n.\r\n"), (b"", b""))
        self.assertEqual(decoder.rejection, LONG_LINE)

    def test_bare_lf_after_dropped_part(self) -> None:
        """A long line that ends in a bare LF is reported as a bare LF."""
        decoder = DataDecoder(max_line_length=20)
        decoder.feed(b"x" * 30)
        decoder.feed(b"\n\r\n.\r\n")
        self.assertEqual(decoder.rejection, BARE_LF)

    def test_long_header_line_in_pieces(self) -> None:
        """The rest of a long header line still counts as header."""
        decoder = DataDecoder(max_line_length=20, long_line_policy="wrap", max_header_bytes=60)
        decoder.feed(b"A:" + b"x" * 30)
        decoder.feed(b"yy\r\n" + b"B: 123456789\r\n" * 2)
        self.assertEqual(decoder.rejection, HEADER_TOO_LARGE)

    def test_wrap_exact_multiple(self) -> None:
        """Wrapping a partial line of exactly two segments adds no empty line."""
        decoder = DataDecoder(max_line_length=20, long_line_policy="wrap")
        first, _ = decoder.feed(b"x" * 36)
        second, rest = decoder.feed(b"\r\n.\r\n")
        self.assertEqual(first + second, b"x" * 18 + b"\r\n" + b"x" * 18 + b"\r\n")
        self.assertEqual(rest, b"")

    def test_long_line_bounded_memory(self) -> None:
        """A huge line without LF is never held whole."""
        decoder = DataDecoder(long_line_policy="accept")
        total = 0
        for _ in range(100):
            total += len(decoder.feed(b"x" * 10000)[0])
        self.assertGreater(total, 990000)


_PIECES = st.one_of(
    st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b".\r\n", b"\n.\r\n", b"\r\n.\n", b":", b" ", b"A: b\r\n", b"\r\n\r\n"]),
    st.binary(max_size=8).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
    st.integers(1, 60).map(lambda n: b"x" * n),
)


class DecoderPropertyTests(SynchronousTestCase):
    """The decoder agrees with a line-by-line reference, whatever the cuts."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(_PIECES, max_size=40).map(b"".join),
        st.binary(max_size=10),
        st.lists(st.integers(0, 400), max_size=15),
        st.sampled_from(["reject", "wrap", "accept"]),
        st.booleans(),
    )
    def test_matches_reference(self, body: bytes, tail: bytes, cuts: list[int], long_policy: str, normalize: bool) -> None:
        """Output, end of data and rejection match the reference decoder for any split."""
        stream = body + b"\r\n.\r\n" + tail
        options = {
            "max_line_length": 20,
            "long_line_policy": long_policy,
            "bare_newline_policy": "normalize" if normalize else "reject",
            "max_header_bytes": 1 << 20,
        }
        expected = reference(stream, 18, long_policy, normalize)
        for cut_at in ([], cuts, list(range(len(stream)))):
            result = decode(stream, cut_at, **options)
            self.assertEqual(result[1:], expected[1:])
            if expected[2] is None:
                self.assertEqual(result[0], expected[0])

    @settings(max_examples=100, deadline=None)
    @given(st.lists(_PIECES, max_size=40).map(b"".join), st.lists(st.integers(0, 400), max_size=15))
    def test_header_verdict_independent_of_cuts(self, body: bytes, cuts: list[int]) -> None:
        """The header-size verdict does not depend on the cuts."""
        stream = body + b"\r\n.\r\n"
        options = {"max_line_length": 20, "long_line_policy": "wrap", "bare_newline_policy": "normalize", "max_header_bytes": 40}
        whole, split = decode(stream, [], **options), decode(stream, cuts, **options)
        self.assertEqual(whole[1:], split[1:])
        if whole[2] is None:
            self.assertEqual(whole[0], split[0])
