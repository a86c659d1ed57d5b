"""The shared rate limiter: token buckets and concurrency counters.

One :class:`LimiterService` is shared by the SMTP server and the HTTP API
(design.md section 2, "limiter").  It keys its state by client address (an
IPv6 client by its ``/64`` network), by sender domain and by recipient domain,
never grows past ``max_keys`` keys, and never reads the wall clock: it gets a
``clock``.

The arithmetic lives in :class:`TokenBucket`, which takes ``now`` as a value
and refills lazily from ``(tokens, last)``: there is no timer per bucket.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from gomail.metrics import GomailMetrics

__all__ = [
    "CONCURRENCY_RETRY_SECONDS",
    "RULE_HTTP",
    "RULE_RECIPIENT_DOMAIN_RATE",
    "RULE_SENDER_DOMAIN_RATE",
    "RULE_SMTP_CONCURRENCY",
    "RULE_SMTP_CONNECTION_RATE",
    "RULE_SMTP_MESSAGE_RATE",
    "RULE_SMTP_RECIPIENT_RATE",
    "Decision",
    "ILimiter",
    "LimiterService",
    "RateLimitRules",
    "TokenBucket",
    "client_key",
    "rate_limit_headers",
]

_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Slack for float rounding when comparing token counts.  A debt this small
#: is carried forward, never forgiven, so it cannot add up to a free token.
_EPSILON = 1e-9
# Client addresses whose key and allow-list answer are remembered.
_CLIENT_CACHE = 4096

#: How far ahead ``retry_at`` is put when the concurrency rule refuses: when
#: a session will end is unknown, so this is a hint, not a promise.
CONCURRENCY_RETRY_SECONDS = 60.0

RULE_HTTP = "http"
RULE_SMTP_CONNECTION_RATE = "smtp_connection_rate"
RULE_SMTP_CONCURRENCY = "smtp_concurrency"
RULE_SMTP_MESSAGE_RATE = "smtp_message_rate"
RULE_SMTP_RECIPIENT_RATE = "smtp_recipient_rate"
RULE_SENDER_DOMAIN_RATE = "sender_domain_rate"
RULE_RECIPIENT_DOMAIN_RATE = "recipient_domain_rate"


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of a rate limit check.

    Attributes:
        allowed: Whether the action may go ahead.
        remaining: Whole tokens (or free slots) left after this decision,
            never negative.
        retry_at: Clock time at which the refused action would be allowed
            (``now`` when allowed; ``math.inf`` when it never will be, for
            a cost above the burst or a rate of zero).
        reset_at: Clock time at which the bucket will be full again.
        limit: The whole burst size (or the concurrency limit); ``0`` when
            no rule applied at all.
        rule: The name of the rule this decision is about: the rule that
            refused, or the tightest rule that allowed; ``None`` from a bare
            :class:`TokenBucket` or when no rule is configured.
    """

    allowed: bool
    remaining: int
    retry_at: float
    reset_at: float
    limit: int
    rule: str | None = None


class TokenBucket:
    """A token bucket that refills lazily from ``(tokens, last)``.

    The bucket starts full.  Time is passed in by the caller; time that goes
    backwards refills nothing, and the refill resumes only once the clock has
    passed ``last`` again.

    Attributes:
        rate: Tokens added per second.
        burst: Capacity of the bucket.
        tokens: Tokens held as of ``last`` (may be a rounding hair below 0).
        last: The latest time the bucket has seen, or ``None`` before its
            first use.
    """

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate_per_second: float, burst: float) -> None:
        """Make a full bucket.

        Args:
            rate_per_second: Refill rate, ``>= 0``.
            burst: Capacity, ``> 0``.

        Raises:
            ValueError: For a negative rate or a burst that is not positive.
        """
        _check_bucket(rate_per_second, burst)
        self.rate = float(rate_per_second)
        self.burst = float(burst)
        self.tokens = self.burst
        self.last: float | None = None

    def try_take(self, now: float, cost: float = 1.0) -> Decision:
        """Take ``cost`` tokens if the bucket holds them.

        Args:
            now: The current clock time in seconds.
            cost: Tokens the action costs, ``>= 0``.

        Returns:
            The decision; on refusal nothing is taken.
        """
        return self._decide(now, cost, take=True)

    def peek(self, now: float, cost: float = 1.0) -> Decision:
        """Tell what :meth:`try_take` would answer, without taking.

        Args:
            now: The current clock time in seconds.
            cost: Tokens the action would cost, ``>= 0``.

        Returns:
            The decision :meth:`try_take` would return at ``now``.
        """
        return self._decide(now, cost, take=False)

    def is_full(self, now: float) -> bool:
        """Whether the bucket is full at ``now``; changes nothing.

        Args:
            now: The current clock time in seconds.
        """
        tokens = self.tokens
        if self.last is not None and now > self.last:
            tokens += (now - self.last) * self.rate
        return tokens >= self.burst - _EPSILON

    def reconfigure(self, now: float, rate_per_second: float, burst: float) -> None:
        """Switch to a new rate and burst, keeping the tokens held.

        Tokens earned up to ``now`` are counted at the old rate; the tokens
        held are then clamped to the new burst (never raised to it).

        Args:
            now: The current clock time in seconds.
            rate_per_second: The new refill rate, ``>= 0``.
            burst: The new capacity, ``> 0``.

        Raises:
            ValueError: For a negative rate or a burst that is not positive.
        """
        _check_bucket(rate_per_second, burst)
        self._refill(now)
        self.rate = float(rate_per_second)
        self.burst = float(burst)
        self.tokens = min(self.tokens, self.burst)

    def _refill(self, now: float) -> None:
        if self.last is None:
            self.last = now
        elif now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now

    def _time_for(self, amount: float) -> float:
        """The earliest time, not before ``last``, at which the bucket holds
        ``amount`` tokens (``math.inf`` if never)."""
        last = self.last
        assert last is not None
        if self.tokens >= amount - _EPSILON:
            return last
        if self.rate <= 0 or amount - _EPSILON > self.burst:
            return math.inf
        at = last + (amount - self.tokens) / self.rate
        # Rounding may put ``at`` a hair early; step up until the refill
        # arithmetic (the same as in ``_refill``) really yields ``amount``.
        for _ in range(1000):
            if self._holds(at, amount):
                break
            at = math.nextafter(at, math.inf)
        # Prefer a round time (6.0 over 6.000000000000001) when it is valid.
        rounded = round(at, 6)
        if last < rounded < at and self._holds(rounded, amount):
            at = rounded
        return at

    def _holds(self, at: float, amount: float) -> bool:
        """Whether refilling from ``last`` to ``at`` yields ``amount``."""
        assert self.last is not None
        refilled = self.tokens + (at - self.last) * self.rate
        return min(self.burst, refilled) >= amount - _EPSILON

    def _decide(self, now: float, cost: float, take: bool) -> Decision:
        if not cost >= 0:
            raise ValueError(f"cost must be >= 0, not {cost!r}")
        self._refill(now)
        allowed = self.tokens >= cost - _EPSILON
        tokens_left = self.tokens - cost if allowed else self.tokens
        if take:
            self.tokens = tokens_left
        return Decision(
            allowed=allowed,
            remaining=max(0, math.floor(tokens_left + _EPSILON)),
            retry_at=now if allowed else max(now, self._time_for(cost)),
            reset_at=max(now, self._time_for(self.burst)),
            limit=math.floor(self.burst + _EPSILON),
        )


def _check_bucket(rate_per_second: float, burst: float) -> None:
    if not rate_per_second >= 0 or math.isinf(rate_per_second):
        raise ValueError(f"rate must be a finite number >= 0, not {rate_per_second!r}")
    if not burst > 0 or math.isinf(burst):
        raise ValueError(f"burst must be a finite number > 0, not {burst!r}")


def _parse_ip(address: str) -> _IPAddress | None:
    """The IP address in ``address``, an IPv4-mapped IPv6 one as IPv4.

    Accepts a bare address and, as some proxies write them, ``v4:port``,
    ``[v6]`` and ``[v6]:port``.  Returns ``None`` for anything else.
    """
    text = address.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        text = host
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    return _parse_ip_exact(text)


@functools.lru_cache(maxsize=8192)  # pure, and asked for on every request
def client_key(address: str, ipv6_prefix: int = 64) -> str:
    """The key under which a client is limited.

    Args:
        address: The client's address as the transport reports it.
        ipv6_prefix: Prefix length an IPv6 client is grouped by.

    Returns:
        An IPv4 address as is (also when IPv4-mapped in IPv6), an IPv6
        address as its network (``"2001:db8::/64"``), any other string (a
        UNIX socket path) unchanged.

    Raises:
        ValueError: For a prefix outside ``0..128``.
    """
    if not 0 <= ipv6_prefix <= 128:
        raise ValueError(f"ipv6_prefix must be in 0..128, not {ipv6_prefix!r}")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip), ipv6_prefix), strict=False))
    return str(ip)


def _parse_networks(name: str, cidrs: tuple[str, ...]) -> tuple[_IPNetwork, ...]:
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as e:
            raise ValueError(f"{name}: {cidr!r} is not an IP network: {e}") from None
    return tuple(networks)


def _contains(networks: tuple[_IPNetwork, ...], ip: _IPAddress | None) -> bool:
    return ip is not None and any(ip in network for network in networks)


@dataclass(frozen=True, slots=True)
class RateLimitRules:
    """What the limiter enforces.  ``None`` turns a rule off.

    Rates are per minute; a burst is the bucket size (how many may come at
    once).  The sender- and recipient-domain rules are shared by all
    clients and their burst is one minute's worth (at least 1).

    Attributes:
        http_per_minute: HTTP requests per client.
        http_burst: HTTP burst per client.
        smtp_connections_per_minute: New SMTP connections per client.
        smtp_connection_burst: SMTP connection burst per client.
        smtp_concurrent_per_client: Open SMTP sessions per client.
        smtp_messages_per_minute: SMTP messages (``MAIL FROM``) per client.
        smtp_message_burst: SMTP message burst per client.
        smtp_recipients_per_minute: SMTP recipients (``RCPT TO``) per client.
        smtp_recipient_burst: SMTP recipient burst per client.
        sender_domain_per_minute: Messages per envelope sender domain.
        recipient_domain_per_minute: Recipients per recipient domain.
        allow: CIDRs that are never limited.
        trusted_proxies: CIDRs of proxies whose ``X-Forwarded-For`` is
            believed.
        ipv6_prefix: Prefix length an IPv6 client is keyed by.
        max_keys: Hard cap on buckets held; the least recently used goes.
        idle_seconds: A full bucket unused this long is dropped.
        prune_interval: Seconds between prunes.
        tarpit_seconds: Delay the SMTP server puts before a refusal (not
            used by the limiter itself).
    """

    http_per_minute: float = 60
    http_burst: int = 10
    smtp_connections_per_minute: float | None = None
    smtp_connection_burst: int = 10
    smtp_concurrent_per_client: int | None = 50
    smtp_messages_per_minute: float | None = None
    smtp_message_burst: int = 10
    smtp_recipients_per_minute: float | None = None
    smtp_recipient_burst: int = 50
    sender_domain_per_minute: float | None = None
    recipient_domain_per_minute: float | None = None
    allow: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    ipv6_prefix: int = 64
    max_keys: int = 100_000
    idle_seconds: float = 600
    prune_interval: float = 60
    tarpit_seconds: float = 1.0

    def __post_init__(self) -> None:
        """Refuse values the limiter cannot work with.

        Raises:
            ValueError: Naming the first bad field.
        """
        for name in (
            "http_per_minute",
            "smtp_connections_per_minute",
            "smtp_messages_per_minute",
            "smtp_recipients_per_minute",
            "sender_domain_per_minute",
            "recipient_domain_per_minute",
        ):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, not {value!r}")
        for name in ("idle_seconds", "tarpit_seconds"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        for name in (
            "http_burst",
            "smtp_connection_burst",
            "smtp_message_burst",
            "smtp_recipient_burst",
        ):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)!r}")
        if self.smtp_concurrent_per_client is not None and self.smtp_concurrent_per_client < 0:
            raise ValueError(f"smtp_concurrent_per_client must be >= 0, not {self.smtp_concurrent_per_client!r}")
        if not 0 <= self.ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be in 0..128, not {self.ipv6_prefix!r}")
        if self.max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, not {self.max_keys!r}")
        if not self.prune_interval > 0:
            raise ValueError(f"prune_interval must be > 0, not {self.prune_interval!r}")
        _parse_networks("allow", self.allow)
        _parse_networks("trusted_proxies", self.trusted_proxies)

    def bucket_rules(self) -> dict[str, tuple[float, float] | None]:
        """Every token-bucket rule by name: ``(rate_per_second, burst)``, or
        ``None`` when the rule is off."""

        def per_client(per_minute: float | None, burst: int) -> tuple[float, float] | None:
            return None if per_minute is None else (per_minute / 60.0, float(burst))

        def per_domain(per_minute: float | None) -> tuple[float, float] | None:
            return None if per_minute is None else (per_minute / 60.0, max(1.0, float(per_minute)))

        return {
            RULE_HTTP: per_client(self.http_per_minute, self.http_burst),
            RULE_SMTP_CONNECTION_RATE: per_client(self.smtp_connections_per_minute, self.smtp_connection_burst),
            RULE_SMTP_MESSAGE_RATE: per_client(self.smtp_messages_per_minute, self.smtp_message_burst),
            RULE_SMTP_RECIPIENT_RATE: per_client(self.smtp_recipients_per_minute, self.smtp_recipient_burst),
            RULE_SENDER_DOMAIN_RATE: per_domain(self.sender_domain_per_minute),
            RULE_RECIPIENT_DOMAIN_RATE: per_domain(self.recipient_domain_per_minute),
        }


class ILimiter(Interface):
    """Rate limits shared by every transport.

    Addresses are as the transport reports them (an IP address string, or a
    UNIX socket path); the limiter does the keying.
    """

    rules = Attribute("The RateLimitRules in force.")

    def check_http(address: str) -> Decision:
        """Charge one HTTP request to the client ``address``."""

    def real_client(peer: str, forwarded_for: str | None) -> str:
        """The client address to limit: the right-most ``X-Forwarded-For``
        hop that is not a trusted proxy when ``peer`` is a trusted proxy,
        otherwise ``peer``.  Several header lines are joined with ``,``."""

    def smtp_connect(address: str) -> Decision:
        """Admit a new SMTP session (connection rate and concurrency); an
        admitted session counts as open until :meth:`smtp_disconnect`."""

    def smtp_disconnect(address: str) -> None:
        """Release a session that :meth:`smtp_connect` admitted."""

    def smtp_message(address: str, sender_domain: str | None) -> Decision:
        """Charge one message (``MAIL FROM``) to the client and the sender
        domain."""

    def smtp_recipient(address: str, recipient_domain: str | None) -> Decision:
        """Charge one recipient (``RCPT TO``) to the client and the
        recipient domain."""

    def reload(rules: RateLimitRules) -> None:
        """Enforce new rules from now on, keeping the state already held."""


@dataclass(slots=True)
class _Check:
    rule: str
    key: str
    rate: float
    burst: float


class _Networks(NamedTuple):
    allow: tuple[_IPNetwork, ...]
    trusted_proxies: tuple[_IPNetwork, ...]


@implementer(ILimiter)
class LimiterService(Service):
    """The limiter: token buckets and SMTP session counters in memory.

    Buckets sit in an LRU ``OrderedDict`` capped at ``max_keys``; a
    ``LoopingCall`` on ``clock`` drops those that are full and idle.
    Session counters are dropped when they reach zero.
    """

    _log = Logger()

    def __init__(
        self,
        rules: RateLimitRules,
        clock: IReactorTime,
        metrics: GomailMetrics | None = None,
    ) -> None:
        """Make the limiter.

        Args:
            rules: The rules to enforce.
            clock: Source of time and of the prune timer.
            metrics: Where decisions and key counts are counted, if anywhere.
        """
        self.rules = rules
        self._clock = clock
        self._metrics = metrics
        self._bucket_rules = rules.bucket_rules()
        self._networks = _Networks(
            allow=_parse_networks("allow", rules.allow),
            trusted_proxies=_parse_networks("trusted_proxies", rules.trusted_proxies),
        )
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self._clients: dict[str, tuple[str, bool]] = {}
        self._sessions_by_key: Counter[str] = Counter()
        self._sessions_by_address: Counter[str] = Counter()
        self._evicted = 0
        self._prune_loop = LoopingCall(self._prune)
        self._prune_loop.clock = clock

    # Service

    def startService(self) -> None:
        """Start pruning idle buckets every ``prune_interval`` seconds."""
        super().startService()
        self._start_pruning()

    def stopService(self) -> None:
        """Stop pruning; the state is kept."""
        if self._prune_loop.running:
            self._prune_loop.stop()
        super().stopService()

    # ILimiter

    def check_http(self, address: str) -> Decision:
        """Charge one HTTP request to the client ``address``.

        Args:
            address: The client address (see :meth:`real_client`).

        Returns:
            The decision of rule ``"http"``.
        """
        return self._decide("http", address, [self._client_check(RULE_HTTP, address)])

    def real_client(self, peer: str, forwarded_for: str | None) -> str:
        """The client address to limit.

        Only a trusted proxy may name the client: the hops of
        ``X-Forwarded-For`` are read right to left, skipping trusted
        proxies, and the first other hop is the client.  A hop that is not
        an IP address stops the search and the peer is used.

        Args:
            peer: The address of the TCP peer.
            forwarded_for: The ``X-Forwarded-For`` value (several header
                lines joined with ``,``), or ``None``.

        Returns:
            The address to pass to :meth:`check_http`.
        """
        trusted = self._networks.trusted_proxies
        if not forwarded_for or not _contains(trusted, _parse_ip_exact(peer)):
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        client = peer
        for hop in reversed(hops):
            ip = _parse_ip(hop)
            if ip is None:
                self._log.debug("unparseable X-Forwarded-For hop from proxy {peer}", peer=peer)
                return peer
            client = str(ip)
            if not _contains(trusted, ip):
                return client
        # Every hop is a trusted proxy: the left-most one is the client.
        return client

    def smtp_connect(self, address: str) -> Decision:
        """Admit a new SMTP session.

        The concurrency rule is checked first (it costs nothing), then the
        connection rate.  When both allow, the session counts as open.

        Args:
            address: The client address.

        Returns:
            The decision; ``rule`` is ``"smtp_concurrency"`` or
            ``"smtp_connection_rate"`` for a refusal.
        """
        now = self._clock.seconds()
        key = client_key(address, self.rules.ipv6_prefix)
        allowed_by_list = self._in_allow_list(address)
        concurrency: Decision | None = None
        limit = self.rules.smtp_concurrent_per_client
        if limit is not None:
            open_sessions = self._sessions_by_key[key]
            if not allowed_by_list and open_sessions >= limit:
                concurrency = Decision(
                    allowed=False,
                    remaining=0,
                    retry_at=now + CONCURRENCY_RETRY_SECONDS,
                    reset_at=now,
                    limit=limit,
                    rule=RULE_SMTP_CONCURRENCY,
                )
                self._count("smtp", concurrency)
                self._log.debug(
                    "SMTP client {client} over {limit} concurrent sessions",
                    client=key,
                    limit=limit,
                )
                return concurrency
            free = limit if allowed_by_list else max(0, limit - open_sessions - 1)
            concurrency = Decision(
                allowed=True,
                remaining=free,
                retry_at=now,
                reset_at=now,
                limit=limit,
                rule=RULE_SMTP_CONCURRENCY,
            )
            self._count("smtp", concurrency)
        checks = [self._client_check(RULE_SMTP_CONNECTION_RATE, address)]
        decision = self._decide("smtp", address, checks, now=now)
        if not decision.allowed:
            return decision
        if concurrency is not None and (decision.rule is None or concurrency.remaining < decision.remaining):
            decision = concurrency
        self._sessions_by_key[key] += 1
        self._sessions_by_address[_exact(address)] += 1
        self._update_keys_gauge()
        return decision

    def smtp_disconnect(self, address: str) -> None:
        """Release a session that :meth:`smtp_connect` admitted.

        Args:
            address: The client address given to :meth:`smtp_connect`.
        """
        exact = _exact(address)
        if exact not in self._sessions_by_address:
            self._log.warn("SMTP disconnect of {client} without an open session", client=exact)
            return
        _decrement(self._sessions_by_address, exact)
        _decrement(self._sessions_by_key, client_key(address, self.rules.ipv6_prefix))
        self._update_keys_gauge()

    def smtp_message(self, address: str, sender_domain: str | None) -> Decision:
        """Charge one message to the client and to the sender domain.

        Args:
            address: The client address.
            sender_domain: The domain of the envelope sender, or ``None``
                (the null sender ``<>``).

        Returns:
            The decision; ``rule`` is ``"smtp_message_rate"`` or
            ``"sender_domain_rate"`` for a refusal.
        """
        checks = [
            self._client_check(RULE_SMTP_MESSAGE_RATE, address),
            self._domain_check(RULE_SENDER_DOMAIN_RATE, sender_domain),
        ]
        return self._decide("smtp", address, checks)

    def smtp_recipient(self, address: str, recipient_domain: str | None) -> Decision:
        """Charge one recipient to the client and to the recipient domain.

        Args:
            address: The client address.
            recipient_domain: The domain of the recipient, or ``None``.

        Returns:
            The decision; ``rule`` is ``"smtp_recipient_rate"`` or
            ``"recipient_domain_rate"`` for a refusal.
        """
        checks = [
            self._client_check(RULE_SMTP_RECIPIENT_RATE, address),
            self._domain_check(RULE_RECIPIENT_DOMAIN_RATE, recipient_domain),
        ]
        return self._decide("smtp", address, checks)

    def reload(self, rules: RateLimitRules) -> None:
        """Enforce new rules from now on.

        Buckets of a rule that is now off are dropped; the others take the
        new rate and burst, their tokens clamped to the new burst.  Open
        sessions stay counted (re-keyed if ``ipv6_prefix`` changed).

        Args:
            rules: The new rules.
        """
        now = self._clock.seconds()
        networks = _Networks(
            allow=_parse_networks("allow", rules.allow),
            trusted_proxies=_parse_networks("trusted_proxies", rules.trusted_proxies),
        )
        bucket_rules = rules.bucket_rules()
        for bucket_key, bucket in list(self._buckets.items()):
            params = bucket_rules[bucket_key[0]]
            if params is None:
                del self._buckets[bucket_key]
            else:
                bucket.reconfigure(now, *params)
        if rules.ipv6_prefix != self.rules.ipv6_prefix:
            self._sessions_by_key = Counter()
            for exact, count in self._sessions_by_address.items():
                self._sessions_by_key[client_key(exact, rules.ipv6_prefix)] += count
        interval_changed = rules.prune_interval != self.rules.prune_interval
        self.rules = rules
        self._bucket_rules = bucket_rules
        self._networks = networks
        self._clients.clear()
        self._evict_over_cap()
        self._update_keys_gauge()
        if interval_changed and self._prune_loop.running:
            self._prune_loop.stop()
            self._start_pruning()
        self._log.info("rate limits reloaded")

    # internals

    def _start_pruning(self) -> None:
        d = self._prune_loop.start(self.rules.prune_interval, now=False)
        d.addErrback(self._prune_loop_failed)

    def _prune_loop_failed(self, failure: Failure) -> None:
        self._log.failure("rate limiter prune loop stopped", failure)

    def _prune(self) -> None:
        """Drop buckets that are full and idle; log evictions since last."""
        try:
            now = self._clock.seconds()
            idle_before = now - self.rules.idle_seconds
            idle_and_full = []
            # The LRU order is the order of last use, so the idle ones are first.
            for bucket_key, bucket in self._buckets.items():
                if bucket.last is not None and bucket.last >= idle_before:
                    break
                if bucket.is_full(now):
                    idle_and_full.append(bucket_key)
            for bucket_key in idle_and_full:
                del self._buckets[bucket_key]
            if idle_and_full:
                self._log.debug("pruned {count} idle rate limit buckets", count=len(idle_and_full))
            if self._evicted:
                self._log.warn(
                    "rate limiter held {max_keys} keys and evicted {count} in use",
                    max_keys=self.rules.max_keys,
                    count=self._evicted,
                )
                self._evicted = 0
            self._update_keys_gauge()
        except Exception:  # noqa: BLE001 -- an escaping error would end the LoopingCall
            self._log.failure("pruning rate limit buckets failed")

    def _in_allow_list(self, address: str) -> bool:
        return self._client(address)[1]

    def _client(self, address: str) -> tuple[str, bool]:
        """``(client_key, allow-listed)`` of ``address``, remembered: parsing an
        IP address costs microseconds, and MAIL and RCPT ask for every message."""
        found = self._clients.get(address)
        if found is None:
            allowed = bool(self._networks.allow) and _contains(self._networks.allow, _parse_ip_exact(address))
            found = (client_key(address, self.rules.ipv6_prefix), allowed)
            if len(self._clients) >= _CLIENT_CACHE:
                self._clients.clear()
            self._clients[address] = found
        return found

    def _client_check(self, rule: str, address: str) -> _Check | None:
        params = self._bucket_rules[rule]
        if params is None:
            return None
        return _Check(rule, self._client(address)[0], *params)

    def _domain_check(self, rule: str, domain: str | None) -> _Check | None:
        params = self._bucket_rules[rule]
        if params is None or not domain:
            return None
        return _Check(rule, domain.strip().rstrip(".").lower(), *params)

    def _decide(
        self,
        protocol: str,
        address: str,
        maybe_checks: list[_Check | None],
        now: float | None = None,
    ) -> Decision:
        """Apply ``checks`` all or nothing: tokens are taken only if every
        rule allows.  Rules are counted in order up to the first refusal."""
        if now is None:
            now = self._clock.seconds()
        checks = [check for check in maybe_checks if check is not None]
        if not checks:
            return Decision(allowed=True, remaining=0, retry_at=now, reset_at=now, limit=0)
        if self._in_allow_list(address):
            passes = [_pass(check, now) for check in checks]
            for decision in passes:
                self._count(protocol, decision)
            return passes[0]
        buckets = [self._bucket(check) for check in checks]
        for check, bucket in zip(checks, buckets, strict=True):
            decision = _with_rule(bucket.peek(now), check.rule)
            self._count(protocol, decision)
            if not decision.allowed:
                self._log.debug(
                    "{protocol} client {client} rate limited by {rule} on {key}",
                    protocol=protocol,
                    client=address,
                    rule=check.rule,
                    key=check.key,
                )
                self._evict_over_cap()
                self._update_keys_gauge()
                return decision
        # Every rule allows: only now take from each.
        decisions = [_with_rule(bucket.try_take(now), check.rule) for check, bucket in zip(checks, buckets, strict=True)]
        self._evict_over_cap()
        self._update_keys_gauge()
        return min(decisions, key=lambda d: d.remaining)

    def _bucket(self, check: _Check) -> TokenBucket:
        bucket_key = (check.rule, check.key)
        bucket = self._buckets.get(bucket_key)
        if bucket is None:
            bucket = TokenBucket(check.rate, check.burst)
            self._buckets[bucket_key] = bucket
        else:
            self._buckets.move_to_end(bucket_key)
        return bucket

    def _evict_over_cap(self) -> None:
        while len(self._buckets) > self.rules.max_keys:
            self._buckets.popitem(last=False)
            self._evicted += 1

    def _count(self, protocol: str, decision: Decision) -> None:
        if self._metrics is not None:
            outcome = "allow" if decision.allowed else "deny"
            self._metrics.child(self._metrics.ratelimit_decisions, protocol, str(decision.rule), outcome).inc()

    def _update_keys_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.ratelimit_keys.set(len(self._buckets) + len(self._sessions_by_key))


def _with_rule(decision: Decision, rule: str) -> Decision:
    """``decision`` about ``rule`` (``dataclasses.replace`` is several times slower)."""
    return Decision(decision.allowed, decision.remaining, decision.retry_at, decision.reset_at, decision.limit, rule)


def _pass(check: _Check, now: float) -> Decision:
    """A decision that lets an allow-listed client through ``check``."""
    limit = math.floor(check.burst + _EPSILON)
    return Decision(
        allowed=True,
        remaining=limit,
        retry_at=now,
        reset_at=now,
        limit=limit,
        rule=check.rule,
    )


@functools.lru_cache(maxsize=8192)
def _parse_ip_exact(address: str) -> _IPAddress | None:
    """A transport-reported address as an IP (IPv4-mapped as IPv4), else
    ``None``; unlike :func:`_parse_ip` no port or brackets are accepted."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _exact(address: str) -> str:
    """The full, normalised form of an address (for session bookkeeping)."""
    ip = _parse_ip_exact(address)
    return address if ip is None else str(ip)


def _decrement(counter: Counter[str], key: str) -> None:
    if counter[key] <= 1:
        counter.pop(key, None)
    else:
        counter[key] -= 1


def rate_limit_headers(decision: Decision, now: float) -> dict[str, str]:
    """HTTP headers describing ``decision``.

    Args:
        decision: The decision to describe.
        now: The clock time the response is sent.

    Returns:
        ``X-RateLimit-Limit``, ``X-RateLimit-Remaining``,
        ``X-RateLimit-Reset`` (whole seconds until the bucket is full) and,
        when refused, ``Retry-After`` (whole seconds, at least 1).  A time
        that never comes (``math.inf``) leaves its header out.
    """
    headers = {
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
    }
    if math.isfinite(decision.reset_at):
        headers["X-RateLimit-Reset"] = str(_ceil_seconds(decision.reset_at - now))
    if not decision.allowed and math.isfinite(decision.retry_at):
        headers["Retry-After"] = str(max(1, _ceil_seconds(decision.retry_at - now)))
    return headers


def _ceil_seconds(seconds: float) -> int:
    """Whole seconds, rounded up, after rounding away float noise below 1 µs."""
    return max(0, math.ceil(round(seconds, 6)))
