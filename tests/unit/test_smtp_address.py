"""Tests for gomail.smtp.address: RFC 5321 paths and ESMTP parameters."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from gomail.errors import InvalidSyntax
from gomail.smtp.address import AddressError, _parse_path, domain_of, parse_path_argument, safe_text, simple_path


class ParsePathTests(SynchronousTestCase):
    """parse_path_argument accepts RFC 5321 paths and explains what it refuses."""

    def assert_error(self, arg: str, code: int, enhanced: str, *, smtputf8: bool = False) -> AddressError:
        """Assert that parsing ``arg`` fails with the given reply codes."""
        with self.assertRaises(AddressError) as caught:
            parse_path_argument(arg, smtputf8_allowed=smtputf8)
        self.assertEqual(caught.exception.smtp_reply(), (code, enhanced))
        self.assertIsInstance(caught.exception, InvalidSyntax)
        return caught.exception

    def test_sender(self) -> None:
        """A plain sender path gives the address and no parameters."""
        self.assertEqual(parse_path_argument("FROM:<a@example.org>", smtputf8_allowed=False), ("a@example.org", {}))

    def test_recipient(self) -> None:
        """A plain recipient path gives the address."""
        self.assertEqual(parse_path_argument("TO:<u@example.com>", smtputf8_allowed=False), ("u@example.com", {}))

    def test_null_sender(self) -> None:
        """``<>`` is the null sender, returned as the empty string."""
        self.assertEqual(parse_path_argument("FROM:<>", smtputf8_allowed=False), ("", {}))

    def test_null_recipient_refused(self) -> None:
        """``<>`` is not a recipient."""
        self.assert_error("TO:<>", 501, "5.1.3")

    def test_space_after_colon(self) -> None:
        """A space after the colon is tolerated."""
        self.assertEqual(parse_path_argument("FROM: <a@b.org>", smtputf8_allowed=False), ("a@b.org", {}))

    def test_keyword_case(self) -> None:
        """Keywords are case-insensitive."""
        self.assertEqual(parse_path_argument("from:<a@b.org>", smtputf8_allowed=False)[0], "a@b.org")
        self.assertEqual(parse_path_argument("To:<a@b.org>", smtputf8_allowed=False)[0], "a@b.org")

    def test_missing_keyword(self) -> None:
        """Without FROM:/TO: the argument is a syntax error."""
        self.assert_error("<a@b.org>", 501, "5.5.4")

    def test_without_brackets(self) -> None:
        """A bare address without angle brackets is tolerated."""
        self.assertEqual(parse_path_argument("FROM:a@b.org SIZE=5", smtputf8_allowed=False), ("a@b.org", {"SIZE": "5"}))

    def test_parameters(self) -> None:
        """Parameters are split, keywords upper-cased, flags have no value."""
        self.assertEqual(
            parse_path_argument("FROM:<a@b.org> size=10  BODY=8BITMIME SMTPUTF8", smtputf8_allowed=True),
            ("a@b.org", {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}),
        )

    def test_bad_parameter(self) -> None:
        """A malformed parameter is 501 5.5.4."""
        error = self.assert_error("FROM:<a@b.org> =x", 501, "5.5.4")
        self.assertEqual(error.message, "Error: bad parameter syntax: =x")

    def test_duplicate_parameter(self) -> None:
        """A parameter given twice is 501 5.5.4."""
        self.assert_error("FROM:<a@b.org> SIZE=1 size=2", 501, "5.5.4")

    def test_quoted_local_part(self) -> None:
        """Quoted local parts may hold spaces, ``@`` and ``>``."""
        self.assertEqual(parse_path_argument('TO:<"a b@c>d"@example.com>', smtputf8_allowed=False)[0], '"a b@c>d"@example.com')

    def test_needless_quotes_removed(self) -> None:
        """A quoted local part that is a valid dot-string is unquoted."""
        self.assertEqual(parse_path_argument('TO:<"john.doe"@example.com>', smtputf8_allowed=False)[0], "john.doe@example.com")

    def test_quoted_pair(self) -> None:
        """Backslash escapes in quoted local parts are kept."""
        self.assertEqual(parse_path_argument(r'TO:<"a\"b"@example.com>', smtputf8_allowed=False)[0], r'"a\"b"@example.com')

    def test_source_route_ignored(self) -> None:
        """A source route is parsed and dropped."""
        self.assertEqual(parse_path_argument("TO:<@a.org,@b.org:u@example.com>", smtputf8_allowed=False)[0], "u@example.com")

    def test_bad_source_route(self) -> None:
        """A malformed source route is refused."""
        self.assert_error("TO:<@a.org;u@example.com>", 501, "5.1.3")

    def test_bad_sender_syntax(self) -> None:
        """Bad sender syntax is 501 5.1.7."""
        error = self.assert_error("FROM:<a b@c.org>", 501, "5.1.7")
        self.assertEqual(error.message, "Bad sender address syntax")

    def test_bad_recipient_syntax(self) -> None:
        """Bad recipient syntax is 501 5.1.3."""
        error = self.assert_error("TO:<a..b@c.org>", 501, "5.1.3")
        self.assertEqual(error.message, "Bad recipient address syntax")

    def test_unclosed_bracket(self) -> None:
        """A path without ``>`` is refused."""
        self.assert_error("TO:<u@example.com", 501, "5.1.3")

    def test_text_after_path(self) -> None:
        """Text glued to the closing bracket is refused."""
        self.assert_error("TO:<u@example.com>x", 501, "5.1.3")

    def test_no_domain(self) -> None:
        """A mailbox without a domain is refused."""
        self.assert_error("TO:<user>", 501, "5.1.3")
        self.assert_error("TO:<user@>", 501, "5.1.3")

    def test_bad_domains(self) -> None:
        """Domains with empty labels, trailing dots or bad hyphens are refused."""
        for domain in ("a..b", "a.b.", "-a.b", "a-.b", "a_b.c"):
            self.assert_error(f"TO:<u@{domain}>", 501, "5.1.3")

    def test_postmaster(self) -> None:
        """``<postmaster>`` without a domain is a valid recipient (RFC 5321 4.5.1)."""
        self.assertEqual(parse_path_argument("TO:<Postmaster>", smtputf8_allowed=False)[0], "Postmaster")
        self.assert_error("FROM:<postmaster>", 501, "5.1.7")

    def test_address_literals(self) -> None:
        """IPv4 and IPv6 address literals are domains."""
        self.assertEqual(parse_path_argument("TO:<u@[192.0.2.1]>", smtputf8_allowed=False)[0], "u@[192.0.2.1]")
        self.assertEqual(parse_path_argument("TO:<u@[IPv6:2001:db8::1]>", smtputf8_allowed=False)[0], "u@[IPv6:2001:db8::1]")
        self.assert_error("TO:<u@[192.0.2.300]>", 501, "5.1.3")
        self.assert_error("TO:<u@[foo:bar]>", 501, "5.1.3")

    def test_local_part_limit(self) -> None:
        """A 64-octet local part is fine; 65 octets is 553 5.1.3 (5.1.7 for senders)."""
        self.assertEqual(parse_path_argument(f"TO:<{'a' * 64}@b.org>", smtputf8_allowed=False)[0], "a" * 64 + "@b.org")
        self.assertEqual(self.assert_error(f"TO:<{'a' * 65}@b.org>", 553, "5.1.3").message, "Error: local part too long")
        self.assert_error(f"FROM:<{'a' * 65}@b.org>", 553, "5.1.7")

    def test_domain_limit(self) -> None:
        """A domain over 255 octets is 553 5.1.3."""
        domain = ".".join(["a" * 63] * 4) + ".bc"
        self.assert_error(f"TO:<a@{domain}>", 553, "5.1.3")

    def test_path_limit(self) -> None:
        """A path over 256 octets (route included) is 501."""
        route = ",".join(["@" + "r" * 60 + ".org"] * 4)
        error = self.assert_error(f"TO:<{route}:u@example.com>", 501, "5.1.3")
        self.assertEqual(error.message, "Error: path too long")

    def test_long_label(self) -> None:
        """A DNS label over 63 octets is refused."""
        self.assert_error(f"TO:<u@{'a' * 64}.org>", 501, "5.1.3")

    def test_non_ascii_needs_smtputf8(self) -> None:
        """A non-ASCII address without SMTPUTF8 is 553 5.6.7."""
        error = self.assert_error("TO:<jöran@example.com>", 553, "5.6.7")
        self.assertEqual(error.message, "Error: non-ASCII address requires SMTPUTF8")

    def test_non_ascii_with_smtputf8(self) -> None:
        """With SMTPUTF8, UTF-8 local parts and domains are accepted."""
        self.assertEqual(parse_path_argument("TO:<jöran@bücher.example>", smtputf8_allowed=True)[0], "jöran@bücher.example")

    def test_non_ascii_sender_needs_parameter(self) -> None:
        """A non-ASCII sender needs the SMTPUTF8 parameter on the same MAIL."""
        self.assert_error("FROM:<jöran@example.com>", 553, "5.6.7", smtputf8=True)
        self.assertEqual(
            parse_path_argument("FROM:<jöran@example.com> SMTPUTF8", smtputf8_allowed=True),
            ("jöran@example.com", {"SMTPUTF8": None}),
        )

    def test_control_characters(self) -> None:
        """Control characters are never part of an address."""
        self.assert_error("TO:<a\rb@example.com>", 501, "5.1.3")
        self.assert_error('TO:<"a\rb"@example.com>', 501, "5.1.3")

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=80), st.booleans())
    def test_never_crashes(self, arg: str, smtputf8: bool) -> None:
        """Arbitrary arguments either parse or raise AddressError."""
        for prefix in ("FROM:", "TO:", ""):
            try:
                address, params = parse_path_argument(prefix + arg, smtputf8_allowed=smtputf8)
            except AddressError as error:
                self.assertIn(error.smtp_reply()[0], (501, 553))
            else:
                self.assertNotIn("\r", address)
                self.assertNotIn("\n", address)
                self.assertIsInstance(params, dict)

    @settings(max_examples=200, deadline=None)
    @given(
        st.from_regex(r"[a-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}(\.[a-z0-9_-]{1,8}){0,3}", fullmatch=True),
        st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{2,6}){1,3}", fullmatch=True),
    )
    def test_dot_atoms_round_trip(self, local: str, domain: str) -> None:
        """Every valid dot-atom address parses to itself."""
        self.assertEqual(parse_path_argument(f"TO:<{local}@{domain}>", smtputf8_allowed=False)[0], f"{local}@{domain}")


    @settings(max_examples=500, deadline=None)
    @given(
        st.sampled_from(["FROM:", "TO:", "from:", "To:", "FROM: ", "MAIL:"]),
        st.from_regex(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~\-\"@\[\]]{0,70}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9.\-\[\]:]{0,80}", fullmatch=True),
        st.sampled_from(["", " SIZE=10", " ", "x"]),
        st.booleans(),
    )
    def test_shortcut_agrees_with_full_parser(self, keyword: str, local: str, domain: str, tail: str, smtputf8: bool) -> None:
        """Whatever the shortcut answers, the full parser answers the same."""
        arg = f"{keyword}<{local}@{domain}>{tail}"
        shortcut = simple_path(arg)
        if shortcut is not None:
            self.assertEqual(_parse_path(arg, smtputf8), (shortcut, {}))

    def test_shortcut_takes_everyday_paths(self) -> None:
        """Plain addresses take the shortcut; limits and oddities do not."""
        self.assertEqual(simple_path("FROM:<bench@example.org>"), "bench@example.org")
        self.assertEqual(simple_path("to:<a.b+tag@mx-1.example.com>"), "a.b+tag@mx-1.example.com")
        for arg in (
            "FROM:<>",
            "FROM: <a@example.org>",
            "TO:<a@example.com> NOTIFY=NEVER",
            'TO:<"a b"@example.com>',
            "TO:<a@[192.0.2.1]>",
            "TO:<@relay.example:a@example.com>",
            f"TO:<{'a' * 65}@example.com>",
            f"TO:<a@{'b' * 64}.com>",
            "TO:<a..b@example.com>",
            "TO:<a@-example.com>",
        ):
            self.assertIsNone(simple_path(arg), arg)


class DomainOfTests(SynchronousTestCase):
    """domain_of gives a normalised domain for limits and routing."""

    def test_lower_case(self) -> None:
        """Domains are lower-cased."""
        self.assertEqual(domain_of("User@Example.COM"), "example.com")

    def test_idna(self) -> None:
        """Internationalised domains become A-labels."""
        self.assertEqual(domain_of("jöran@Bücher.example"), "xn--bcher-kva.example")

    def test_quoted_at(self) -> None:
        """The domain is after the last ``@``."""
        self.assertEqual(domain_of('"a@b"@Example.org'), "example.org")

    def test_no_domain(self) -> None:
        """The null sender and ``postmaster`` have no domain."""
        self.assertEqual(domain_of(""), "")
        self.assertEqual(domain_of("postmaster"), "")

    def test_literal(self) -> None:
        """Address literals are kept as written, lower-cased."""
        self.assertEqual(domain_of("u@[IPv6:2001:DB8::1]"), "[ipv6:2001:db8::1]")


class SafeTextTests(SynchronousTestCase):
    """safe_text makes client text safe to echo."""

    def test_controls_and_length(self) -> None:
        """Control characters become ``?`` and long text is cut."""
        self.assertEqual(safe_text("a\r\nb"), "a??b")
        self.assertEqual(safe_text("x" * 70, 64), "x" * 64 + "...")
