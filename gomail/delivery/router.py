"""Which recipients gomail accepts, and which route each recipient goes to."""

from __future__ import annotations

from zope.interface import implementer

from gomail.delivery.settings import RouteSettings
from gomail.interfaces import IRecipientPolicy

SUBADDRESS_SEPARATOR = "+"


def split_address(address: str) -> tuple[str, str] | None:
    """Split ``local@domain`` at the last ``@``, lower-casing both parts.

    Args:
        address: An envelope address, with or without angle brackets.

    Returns:
        ``(local, domain)``, or ``None`` when the address has no ``@`` or an
        empty part.
    """
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    return local.lower(), domain.lower().rstrip(".")


@implementer(IRecipientPolicy)
class Router:
    """Matches recipients to routes; also the recipient policy of RCPT/HTTP.

    Matching is case-insensitive over the whole address (as Postfix lookup
    tables are).  For each recipient the most specific pattern wins: an exact
    address, then the address without its ``+tag``, then ``*@domain``, then
    ``*``; between equally specific patterns the route listed first wins.
    """

    def __init__(self, domains: tuple[str, ...], routes: tuple[RouteSettings, ...]) -> None:
        """Index the routes.

        Args:
            domains: Recipient domains accepted at all.
            routes: The configured routes, in configuration order.

        Raises:
            ValueError: On a duplicate route name or a malformed pattern.
        """
        self.domains = frozenset(d.lower().rstrip(".") for d in domains)
        self.routes = routes
        self._by_name: dict[str, RouteSettings] = {}
        # Each pattern maps to the first route that lists it.
        self._exact: dict[str, RouteSettings] = {}
        self._domain: dict[str, RouteSettings] = {}
        self._catch_all: RouteSettings | None = None
        for route in routes:
            if route.name in self._by_name:
                raise ValueError(f"duplicate route name {route.name!r}")
            self._by_name[route.name] = route
            for pattern in route.match:
                self._index(pattern, route)

    def _index(self, pattern: str, route: RouteSettings) -> None:
        pattern = pattern.strip()
        if pattern == "*":
            if self._catch_all is None:
                self._catch_all = route
            return
        parts = split_address(pattern)
        if parts is None:
            raise ValueError(f"route {route.name!r}: bad match pattern {pattern!r}")
        local, domain = parts
        if local == "*":
            self._domain.setdefault(domain, route)
        elif "*" in local or "*" in domain:
            raise ValueError(f"route {route.name!r}: bad match pattern {pattern!r}")
        else:
            self._exact.setdefault(f"{local}@{domain}", route)

    def route_named(self, name: str) -> RouteSettings | None:
        """The route called ``name``, or ``None`` if it is not configured."""
        return self._by_name.get(name)

    def route_for(self, address: str) -> RouteSettings | None:
        """The route that takes mail for ``address``, or ``None``."""
        parts = split_address(address)
        if parts is None:
            return None
        local, domain = parts
        route = self._exact.get(f"{local}@{domain}")
        if route is None and SUBADDRESS_SEPARATOR in local:
            base = local.split(SUBADDRESS_SEPARATOR, 1)[0]
            if base:
                route = self._exact.get(f"{base}@{domain}")
        if route is None:
            route = self._domain.get(domain)
        if route is None:
            route = self._catch_all
        return route

    def accepts(self, address: str) -> bool:
        """Whether mail for ``address`` is accepted (its domain is configured
        or a route claims it)."""
        parts = split_address(address)
        if parts is None:
            return False
        if parts[1] in self.domains:
            return True
        return self.route_for(address) is not None

    def routes_for(self, rcpt_to: list[str] | tuple[str, ...]) -> list[tuple[RouteSettings, list[str]]]:
        """Group recipients by the route that takes each one.

        Args:
            rcpt_to: Envelope recipients, in envelope order.

        Returns:
            ``(route, recipients)`` pairs in order of each route's first
            recipient; recipients keep envelope order, and one that no route
            claims (accepted only for its domain) is left out.
        """
        grouped: dict[str, tuple[RouteSettings, list[str]]] = {}
        for address in rcpt_to:
            route = self.route_for(address)
            if route is None:
                continue
            entry = grouped.setdefault(route.name, (route, []))
            if address not in entry[1]:
                entry[1].append(address)
        return list(grouped.values())
