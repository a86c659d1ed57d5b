"""Tests for gomail.delivery.router: recipient policy and route matching."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gomail.delivery.router import Router, split_address
from gomail.delivery.settings import RouteSettings
from gomail.interfaces import IRecipientPolicy

EXACT = RouteSettings(name="exact", match=("sales@example.com",), url="http://h/exact")
DOMAIN = RouteSettings(name="domain", match=("*@example.com",), url="http://h/domain")
OTHER = RouteSettings(name="other", match=("*@Other.Example", "bob@third.example"), url="http://h/other")
CATCH_ALL = RouteSettings(name="all", match=("*",), url="http://h/all")


class RouterTests(SynchronousTestCase):
    """Route matching, most specific first."""

    def setUp(self) -> None:
        self.router = Router(("example.com", "Mail.Example"), (DOMAIN, EXACT, OTHER))

    def test_provides_recipient_policy(self) -> None:
        """Router provides IRecipientPolicy."""
        self.assertTrue(verifyObject(IRecipientPolicy, self.router))

    def test_exact_beats_domain(self) -> None:
        """An exact address wins over *@domain even when its route is listed later."""
        self.assertEqual(self.router.route_for("sales@example.com"), EXACT)
        self.assertEqual(self.router.route_for("support@example.com"), DOMAIN)

    def test_subaddress_matches_base(self) -> None:
        """local+tag@domain matches the route for local@domain."""
        self.assertEqual(self.router.route_for("sales+eu@example.com"), EXACT)
        self.assertEqual(self.router.route_for("bob+x@third.example"), OTHER)
        self.assertIsNone(self.router.route_for("alice+x@third.example"))

    def test_exact_subaddress_route_wins(self) -> None:
        """A route for the exact local+tag address wins over its base."""
        tagged = RouteSettings(name="tagged", match=("sales+eu@example.com",), url="http://h/t")
        router = Router((), (EXACT, tagged))
        self.assertEqual(router.route_for("sales+eu@example.com"), tagged)
        self.assertEqual(router.route_for("sales+us@example.com"), EXACT)

    def test_case_insensitive(self) -> None:
        """Matching ignores case in local part and domain."""
        self.assertEqual(self.router.route_for("SALES@EXAMPLE.COM"), EXACT)
        self.assertEqual(self.router.route_for("x@other.example"), OTHER)

    def test_catch_all_is_last(self) -> None:
        """* takes what nothing more specific takes."""
        router = Router((), (CATCH_ALL, DOMAIN))
        self.assertEqual(router.route_for("a@example.com"), DOMAIN)
        self.assertEqual(router.route_for("a@anything.example"), CATCH_ALL)

    def test_first_route_wins_a_tie(self) -> None:
        """Between two equal patterns the route listed first wins."""
        second = RouteSettings(name="second", match=("*@example.com",), url="http://h/2")
        self.assertEqual(Router((), (DOMAIN, second)).route_for("a@example.com"), DOMAIN)

    def test_accepts(self) -> None:
        """Configured domains and routed addresses are accepted; others refused."""
        self.assertTrue(self.router.accepts("anyone@mail.example"))
        self.assertTrue(self.router.accepts("anyone@EXAMPLE.com"))
        self.assertTrue(self.router.accepts("bob@third.example"))
        self.assertTrue(self.router.accepts("<bob+tag@third.example>"))
        self.assertFalse(self.router.accepts("alice@third.example"))
        self.assertFalse(self.router.accepts("someone@unknown.example"))
        self.assertFalse(self.router.accepts("postmaster"))
        self.assertFalse(self.router.accepts("@example.com"))

    def test_catch_all_accepts_everything(self) -> None:
        """A catch-all route accepts any well-formed address."""
        self.assertTrue(Router((), (CATCH_ALL,)).accepts("x@unknown.example"))

    def test_routes_for_groups_in_order(self) -> None:
        """routes_for groups recipients per route in envelope order, leaving out unrouted ones."""
        groups = self.router.routes_for(["a@example.com", "x@other.example", "sales@example.com", "b@example.com", "z@mail.example"])
        self.assertEqual(
            [(route.name, rcpts) for route, rcpts in groups],
            [("domain", ["a@example.com", "b@example.com"]), ("other", ["x@other.example"]), ("exact", ["sales@example.com"])],
        )

    def test_routes_for_drops_duplicates(self) -> None:
        """A recipient given twice appears once."""
        groups = self.router.routes_for(["a@example.com", "a@example.com"])
        self.assertEqual([(r.name, rcpts) for r, rcpts in groups], [("domain", ["a@example.com"])])

    def test_route_named(self) -> None:
        """route_named finds a route by name."""
        self.assertEqual(self.router.route_named("other"), OTHER)
        self.assertIsNone(self.router.route_named("missing"))

    def test_bad_configuration(self) -> None:
        """Duplicate names and malformed patterns are refused."""
        self.assertRaises(ValueError, Router, (), (DOMAIN, DOMAIN))
        bad = RouteSettings(name="bad", match=("a*b@example.com",), url="http://h/")
        self.assertRaises(ValueError, Router, (), (bad,))
        self.assertRaises(ValueError, Router, (), (RouteSettings(name="bad", match=("nodomain",), url="http://h/"),))

    def test_split_address(self) -> None:
        """split_address lower-cases and splits at the last @."""
        self.assertEqual(split_address(' "a@b"@Example.COM. '), ('"a@b"', "example.com"))
        self.assertIsNone(split_address("nobody"))


class RouteSettingsTests(SynchronousTestCase):
    """RouteSettings validation."""

    def test_rejects_unknown_modes(self) -> None:
        """raw, fan_out, concurrency and timeout are checked."""
        self.assertRaises(ValueError, RouteSettings, name="r", match=("*",), url="http://h/", raw="inline")
        self.assertRaises(ValueError, RouteSettings, name="r", match=("*",), url="http://h/", fan_out="all")
        self.assertRaises(ValueError, RouteSettings, name="r", match=("*",), url="http://h/", concurrency=0)
        self.assertRaises(ValueError, RouteSettings, name="r", match=("*",), url="http://h/", timeout=0)
