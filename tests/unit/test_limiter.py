"""Tests for gomail.limiter: token buckets, keying and the limiter service."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gomail.limiter import (
    CONCURRENCY_RETRY_SECONDS,
    Decision,
    ILimiter,
    LimiterService,
    RateLimitRules,
    TokenBucket,
    client_key,
    rate_limit_headers,
)
from gomail.metrics import GomailMetrics

# Tolerance for float arithmetic in the property checks (tokens).
_SLACK = 1e-6


def _limiter(rules: RateLimitRules | None = None, metrics: GomailMetrics | None = None) -> tuple[LimiterService, Clock]:
    clock = Clock()
    return LimiterService(rules or RateLimitRules(), clock, metrics), clock


def _metrics() -> GomailMetrics:
    return GomailMetrics(CollectorRegistry())


def _decisions(metrics: GomailMetrics, protocol: str, rule: str, decision: str) -> float | None:
    return metrics.registry.get_sample_value(
        "gomail_ratelimit_decisions_total",
        {"protocol": protocol, "rule": rule, "decision": decision},
    )


def _keys(metrics: GomailMetrics) -> float | None:
    return metrics.registry.get_sample_value("gomail_ratelimit_keys")


class TokenBucketTests(SynchronousTestCase):
    """The pure token bucket."""

    def test_burst_then_deny(self) -> None:
        """A full bucket grants exactly its burst at one instant, then refuses."""
        bucket = TokenBucket(1.0, 10)
        results = [bucket.try_take(100.0) for _ in range(11)]
        self.assertEqual([d.allowed for d in results], [True] * 10 + [False])
        self.assertEqual([d.remaining for d in results], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0])
        self.assertEqual({d.limit for d in results}, {10})

    def test_refill_timing(self) -> None:
        """At 10 per minute an empty bucket grants the next token after exactly 6 s."""
        bucket = TokenBucket(10 / 60, 10)
        for _ in range(10):
            bucket.try_take(0.0)
        self.assertFalse(bucket.try_take(5.999).allowed)
        self.assertTrue(bucket.try_take(6.0).allowed)
        self.assertFalse(bucket.try_take(6.0).allowed)
        self.assertTrue(bucket.try_take(12.0).allowed)

    def test_retry_at_exact(self) -> None:
        """A refusal names the exact time the cost is available and when the bucket is full."""
        bucket = TokenBucket(10 / 60, 10)
        for _ in range(10):
            bucket.try_take(0.0)
        refused = bucket.try_take(1.0)
        self.assertEqual(
            refused,
            Decision(
                allowed=False,
                remaining=0,
                retry_at=6.0,
                reset_at=60.0,
                limit=10,
                rule=None,
            ),
        )
        self.assertEqual(bucket.try_take(1.0, cost=3).retry_at, 18.0)
        granted = bucket.try_take(refused.retry_at)
        self.assertEqual(
            granted,
            Decision(
                allowed=True,
                remaining=0,
                retry_at=6.0,
                reset_at=66.0,
                limit=10,
                rule=None,
            ),
        )

    def test_retry_at_is_honoured_at_epoch_times(self) -> None:
        """Taking at retry_at succeeds even where float rounding of epoch times bites."""
        for rate in (1 / 7, 10 / 60, 1 / 3, 0.9, 13.0):
            bucket = TokenBucket(rate, 3)
            now = 1_700_000_000.123
            for _ in range(3):
                bucket.try_take(now)
            refused = bucket.try_take(now)
            self.assertFalse(refused.allowed)
            self.assertTrue(bucket.try_take(refused.retry_at).allowed, rate)

    def test_allowed_retry_at_is_now(self) -> None:
        """A grant has retry_at equal to now."""
        self.assertEqual(TokenBucket(1.0, 5).try_take(42.5).retry_at, 42.5)

    def test_full_bucket_reset_is_now(self) -> None:
        """A bucket that stays full resets now."""
        bucket = TokenBucket(1.0, 5)
        self.assertEqual(bucket.peek(7.0), Decision(True, 4, 7.0, 7.0, 5))
        self.assertEqual(bucket.try_take(7.0, cost=0).reset_at, 7.0)

    def test_peek_takes_nothing(self) -> None:
        """peek answers like try_take but leaves the tokens alone."""
        bucket = TokenBucket(1.0, 2)
        self.assertEqual(bucket.peek(0.0), bucket.peek(0.0))
        self.assertEqual(bucket.try_take(0.0).remaining, 1)

    def test_time_going_backwards_grants_nothing(self) -> None:
        """A clock that steps back refills nothing until it passes the last time again."""
        bucket = TokenBucket(10 / 60, 2)
        bucket.try_take(100.0)
        bucket.try_take(100.0)
        refused = bucket.try_take(40.0)
        self.assertEqual((refused.allowed, refused.retry_at), (False, 106.0))
        self.assertFalse(bucket.try_take(100.0).allowed)
        self.assertFalse(bucket.try_take(105.9).allowed)
        self.assertTrue(bucket.try_take(106.0).allowed)

    def test_remaining_is_floored(self) -> None:
        """Fractional tokens are not counted as remaining."""
        bucket = TokenBucket(1.0, 5)
        self.assertEqual(bucket.try_take(0.0, cost=2.5).remaining, 2)

    def test_cost_above_burst_is_never_granted(self) -> None:
        """A cost larger than the burst is refused with retry_at at infinity."""
        decision = TokenBucket(1.0, 5).try_take(0.0, cost=6)
        self.assertFalse(decision.allowed)
        self.assertEqual(decision.retry_at, math.inf)

    def test_zero_rate_never_refills(self) -> None:
        """A bucket with rate 0 refuses forever once empty."""
        bucket = TokenBucket(0.0, 1)
        bucket.try_take(0.0)
        decision = bucket.try_take(1e9)
        self.assertEqual(
            (decision.allowed, decision.retry_at, decision.reset_at),
            (False, math.inf, math.inf),
        )

    def test_reconfigure_clamps_tokens(self) -> None:
        """A smaller burst clamps the tokens held; a larger one does not add any."""
        bucket = TokenBucket(1.0, 10)
        bucket.try_take(0.0, cost=2)
        bucket.reconfigure(0.0, 1.0, 5)
        self.assertEqual(bucket.tokens, 5.0)
        bucket.reconfigure(0.0, 1.0, 20)
        self.assertEqual(bucket.tokens, 5.0)
        self.assertEqual(bucket.try_take(0.0).limit, 20)

    def test_invalid_arguments(self) -> None:
        """Negative rates, empty bursts and negative costs are refused."""
        self.assertRaises(ValueError, TokenBucket, -1.0, 10)
        self.assertRaises(ValueError, TokenBucket, 1.0, 0)
        self.assertRaises(ValueError, TokenBucket, math.inf, 1)
        self.assertRaises(ValueError, TokenBucket(1.0, 1).try_take, 0.0, -1)


class TokenBucketPropertyTests(SynchronousTestCase):
    """Properties of the token bucket over arbitrary call sequences."""

    @settings(deadline=None, max_examples=300)
    @given(
        rate=st.floats(min_value=0.01, max_value=100),
        burst=st.integers(min_value=1, max_value=20),
        start=st.floats(min_value=0, max_value=2e9),
        steps=st.lists(
            st.tuples(
                st.floats(min_value=-5, max_value=10),
                st.floats(min_value=1, max_value=4),
            ),
            max_size=120,
        ),
    )
    def test_grants_in_any_window_bounded(self, rate: float, burst: int, start: float, steps: list[tuple[float, float]]) -> None:
        """Grants (by count and by cost) in any window of length t never exceed burst + rate*t."""
        bucket = TokenBucket(rate, burst)
        now = start
        latest = -math.inf
        grants: list[tuple[float, float]] = []
        for increment, cost in steps:
            now += increment
            latest = max(latest, now)
            if bucket.try_take(now, cost).allowed:
                # Time that went backwards is charged at the latest time seen.
                grants.append((latest, cost))
        for i in range(len(grants)):
            taken = 0.0
            for j in range(i, len(grants)):
                taken += grants[j][1]
                window = grants[j][0] - grants[i][0]
                self.assertLessEqual(j - i + 1, burst + rate * window + _SLACK)
                self.assertLessEqual(taken, burst + rate * window + _SLACK)

    @settings(deadline=None, max_examples=300)
    @given(
        rate=st.floats(min_value=0, max_value=100),
        burst=st.floats(min_value=0.5, max_value=50),
        start=st.floats(min_value=0, max_value=2e9),
        steps=st.lists(
            st.tuples(
                st.floats(min_value=-5, max_value=10),
                st.floats(min_value=0, max_value=60),
            ),
            max_size=60,
        ),
    )
    def test_decision_invariants(self, rate: float, burst: float, start: float, steps: list[tuple[float, float]]) -> None:
        """retry_at and reset_at are never before now, remaining never negative, grants retry now."""
        bucket = TokenBucket(rate, burst)
        now = start
        for increment, cost in steps:
            now += increment
            decision = bucket.try_take(now, cost)
            self.assertGreaterEqual(decision.retry_at, now)
            self.assertGreaterEqual(decision.reset_at, now)
            self.assertGreaterEqual(decision.remaining, 0)
            self.assertLessEqual(decision.remaining, decision.limit)
            if decision.allowed:
                self.assertEqual(decision.retry_at, now)
            else:
                self.assertGreater(decision.retry_at, now)

    @settings(deadline=None, max_examples=300)
    @given(
        rate=st.floats(min_value=0.001, max_value=100),
        burst=st.integers(min_value=1, max_value=20),
        start=st.floats(min_value=0, max_value=2e9),
        spent=st.integers(min_value=1, max_value=40),
        cost=st.floats(min_value=0.1, max_value=20),
    )
    def test_retry_at_is_honoured(self, rate: float, burst: int, start: float, spent: int, cost: float) -> None:
        """A refused take succeeds at exactly its retry_at when nothing else took meanwhile."""
        bucket = TokenBucket(rate, burst)
        for _ in range(spent):
            bucket.try_take(start)
        refused = bucket.try_take(start, cost)
        if refused.allowed or math.isinf(refused.retry_at):
            return
        self.assertTrue(bucket.try_take(refused.retry_at, cost).allowed)


class ClientKeyTests(SynchronousTestCase):
    """Keying clients by address."""

    def test_ipv4_exact(self) -> None:
        """An IPv4 address is its own key."""
        self.assertEqual(client_key("203.0.113.5"), "203.0.113.5")

    def test_ipv6_masked_to_64(self) -> None:
        """IPv6 addresses in one /64 share a key."""
        self.assertEqual(client_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(client_key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::/64")
        self.assertEqual(client_key("2001:db8:1:3::1"), "2001:db8:1:3::/64")

    def test_ipv6_other_prefix(self) -> None:
        """The IPv6 prefix length is configurable."""
        self.assertEqual(client_key("2001:db8:1:2::1", ipv6_prefix=48), "2001:db8:1::/48")
        self.assertEqual(client_key("2001:db8::1", ipv6_prefix=128), "2001:db8::1/128")

    def test_ipv4_mapped_ipv6_is_ipv4(self) -> None:
        """An IPv4-mapped IPv6 address is keyed as its IPv4 address."""
        self.assertEqual(client_key("::ffff:203.0.113.5"), "203.0.113.5")

    def test_other_strings_unchanged(self) -> None:
        """A UNIX socket path is its own key."""
        self.assertEqual(client_key("/run/gomail/smtp.sock"), "/run/gomail/smtp.sock")
        self.assertEqual(client_key(""), "")

    def test_bad_prefix(self) -> None:
        """A prefix outside 0..128 is refused."""
        self.assertRaises(ValueError, client_key, "2001:db8::1", 129)


class RateLimitRulesTests(SynchronousTestCase):
    """Validation of the rules value."""

    def test_defaults(self) -> None:
        """The defaults limit HTTP at 60/min burst 10 and SMTP at 50 sessions per client."""
        rules = RateLimitRules()
        self.assertEqual((rules.http_per_minute, rules.http_burst), (60, 10))
        self.assertEqual(rules.smtp_concurrent_per_client, 50)
        self.assertIsNone(rules.smtp_connections_per_minute)

    def test_bad_values(self) -> None:
        """Nonsense rates, bursts, prefixes and CIDRs are refused."""
        for bad in (
            {"http_per_minute": 0},
            {"smtp_messages_per_minute": -1},
            {"http_burst": 0},
            {"ipv6_prefix": 129},
            {"max_keys": 0},
            {"prune_interval": 0},
            {"tarpit_seconds": -1},
            {"smtp_concurrent_per_client": -1},
            {"allow": ("not-a-network",)},
            {"trusted_proxies": ("10.0.0.0/33",)},
        ):
            self.assertRaises(ValueError, RateLimitRules, **bad)


class HTTPLimitTests(SynchronousTestCase):
    """check_http and client identification."""

    def test_provides_interface(self) -> None:
        """LimiterService provides ILimiter."""
        limiter, _ = _limiter()
        self.assertTrue(verifyObject(ILimiter, limiter))

    def test_71_rapid_requests(self) -> None:
        """71 rapid requests from one address get exactly 10 grants; another address is unaffected."""
        limiter, clock = _limiter()
        results = []
        for _ in range(71):
            results.append(limiter.check_http("203.0.113.5").allowed)
            clock.advance(0.001)
        self.assertEqual(results, [True] * 10 + [False] * 61)
        other = limiter.check_http("203.0.113.6")
        self.assertEqual((other.allowed, other.remaining, other.rule), (True, 9, "http"))

    def test_refill_on_clock(self) -> None:
        """After the burst, one request is granted per second at 60/min."""
        limiter, clock = _limiter()
        for _ in range(10):
            limiter.check_http("203.0.113.5")
        refused = limiter.check_http("203.0.113.5")
        self.assertEqual((refused.allowed, refused.retry_at, refused.rule), (False, 1.0, "http"))
        clock.advance(1)
        self.assertTrue(limiter.check_http("203.0.113.5").allowed)
        self.assertFalse(limiter.check_http("203.0.113.5").allowed)

    def test_ipv6_keyed_by_64(self) -> None:
        """Addresses in one /64 share a bucket; another /64 has its own."""
        limiter, _ = _limiter()
        for i in range(10):
            self.assertTrue(limiter.check_http(f"2001:db8:0:1::{i + 1:x}").allowed)
        self.assertFalse(limiter.check_http("2001:db8:0:1:ffff::1").allowed)
        self.assertTrue(limiter.check_http("2001:db8:0:2::1").allowed)

    def test_ipv4_mapped_shares_ipv4_bucket(self) -> None:
        """A client seen as ::ffff:a.b.c.d and as a.b.c.d is one client."""
        limiter, _ = _limiter()
        for _ in range(5):
            limiter.check_http("::ffff:203.0.113.5")
        self.assertEqual(limiter.check_http("203.0.113.5").remaining, 4)

    def test_allow_list(self) -> None:
        """Addresses in the allow list are never limited."""
        limiter, _ = _limiter(RateLimitRules(allow=("192.0.2.0/24", "2001:db8::/32")))
        for address in ("192.0.2.7", "::ffff:192.0.2.7", "2001:db8:9::1"):
            results = [limiter.check_http(address) for _ in range(100)]
            self.assertEqual(
                set(results),
                {
                    Decision(
                        allowed=True,
                        remaining=10,
                        retry_at=0.0,
                        reset_at=0.0,
                        limit=10,
                        rule="http",
                    )
                },
            )
        self.assertEqual(sum(limiter.check_http("198.51.100.1").allowed for _ in range(11)), 10)

    def test_unix_socket_client(self) -> None:
        """A UNIX socket client is limited under its path."""
        limiter, _ = _limiter()
        self.assertEqual(sum(limiter.check_http("/run/gomail.sock").allowed for _ in range(11)), 10)

    def test_forwarded_for_rightmost_untrusted_hop(self) -> None:
        """Behind trusted proxies the right-most hop that is not a trusted proxy is the client."""
        limiter, _ = _limiter(RateLimitRules(trusted_proxies=("10.0.0.0/8", "fd00::/8")))
        self.assertEqual(
            limiter.real_client("10.0.0.1", "198.51.100.9, 203.0.113.5, 10.1.1.1"),
            "203.0.113.5",
        )
        self.assertEqual(limiter.real_client("::ffff:10.0.0.1", "203.0.113.5"), "203.0.113.5")
        self.assertEqual(limiter.real_client("fd00::1", "2001:db8::5, fd00::2"), "2001:db8::5")
        self.assertEqual(limiter.real_client("10.0.0.1", "203.0.113.5:4711"), "203.0.113.5")
        self.assertEqual(limiter.real_client("10.0.0.1", "[2001:db8::5]:443"), "2001:db8::5")

    def test_forwarded_for_edge_cases(self) -> None:
        """No header, only proxies, or a garbled hop fall back sensibly."""
        limiter, _ = _limiter(RateLimitRules(trusted_proxies=("10.0.0.0/8",)))
        self.assertEqual(limiter.real_client("10.0.0.1", None), "10.0.0.1")
        self.assertEqual(limiter.real_client("10.0.0.1", " , "), "10.0.0.1")
        self.assertEqual(limiter.real_client("10.0.0.1", "10.0.0.9, 10.0.0.8"), "10.0.0.9")
        self.assertEqual(limiter.real_client("10.0.0.1", "203.0.113.5, unknown"), "10.0.0.1")
        self.assertEqual(limiter.real_client("10.0.0.1", "[2001:db8::5]x"), "10.0.0.1")

    def test_forwarded_for_spoof_from_untrusted_peer_ignored(self) -> None:
        """A client that is not a trusted proxy cannot choose its key with X-Forwarded-For."""
        limiter, _ = _limiter(RateLimitRules(trusted_proxies=("10.0.0.0/8",)))
        granted = 0
        for i in range(20):
            client = limiter.real_client("203.0.113.5", f"198.51.100.{i}")
            self.assertEqual(client, "203.0.113.5")
            granted += limiter.check_http(client).allowed
        self.assertEqual(granted, 10)

    def test_forwarded_for_without_trusted_proxies(self) -> None:
        """With no trusted proxies configured, X-Forwarded-For is never read."""
        limiter, _ = _limiter()
        self.assertEqual(limiter.real_client("10.0.0.1", "203.0.113.5"), "10.0.0.1")


class SMTPLimitTests(SynchronousTestCase):
    """SMTP connections, sessions, messages and recipients."""

    def test_concurrency_count_and_release(self) -> None:
        """Open sessions are counted per client, refused over the limit, and released."""
        metrics = _metrics()
        limiter, _ = _limiter(RateLimitRules(smtp_concurrent_per_client=2), metrics)
        first = limiter.smtp_connect("203.0.113.5")
        self.assertEqual(
            (first.allowed, first.remaining, first.limit, first.rule),
            (True, 1, 2, "smtp_concurrency"),
        )
        self.assertEqual(limiter.smtp_connect("203.0.113.5").remaining, 0)
        refused = limiter.smtp_connect("203.0.113.5")
        self.assertEqual(
            refused,
            Decision(
                allowed=False,
                remaining=0,
                retry_at=CONCURRENCY_RETRY_SECONDS,
                reset_at=0.0,
                limit=2,
                rule="smtp_concurrency",
            ),
        )
        self.assertTrue(limiter.smtp_connect("203.0.113.6").allowed)
        self.assertEqual(_keys(metrics), 2)
        limiter.smtp_disconnect("203.0.113.5")
        self.assertTrue(limiter.smtp_connect("203.0.113.5").allowed)
        for address in ("203.0.113.5", "203.0.113.5", "203.0.113.6"):
            limiter.smtp_disconnect(address)
        self.assertEqual(_keys(metrics), 0)

    def test_disconnect_without_session_is_harmless(self) -> None:
        """Releasing a session that was never admitted changes nothing."""
        limiter, _ = _limiter(RateLimitRules(smtp_concurrent_per_client=1))
        limiter.smtp_disconnect("203.0.113.5")
        self.assertTrue(limiter.smtp_connect("203.0.113.5").allowed)
        limiter.smtp_disconnect("198.51.100.1")
        self.assertFalse(limiter.smtp_connect("203.0.113.5").allowed)

    def test_concurrency_keyed_by_ipv6_64(self) -> None:
        """Sessions from one IPv6 /64 count together."""
        limiter, _ = _limiter(RateLimitRules(smtp_concurrent_per_client=1))
        self.assertTrue(limiter.smtp_connect("2001:db8::1").allowed)
        self.assertFalse(limiter.smtp_connect("2001:db8::2").allowed)
        limiter.smtp_disconnect("2001:db8::1")
        self.assertTrue(limiter.smtp_connect("2001:db8::2").allowed)

    def test_connection_rate(self) -> None:
        """New connections are limited per client; a refused one is not counted as open."""
        metrics = _metrics()
        rules = RateLimitRules(
            smtp_connections_per_minute=6,
            smtp_connection_burst=2,
            smtp_concurrent_per_client=5,
        )
        limiter, clock = _limiter(rules, metrics)
        self.assertEqual(limiter.smtp_connect("203.0.113.5").rule, "smtp_connection_rate")
        self.assertTrue(limiter.smtp_connect("203.0.113.5").allowed)
        refused = limiter.smtp_connect("203.0.113.5")
        self.assertEqual(
            (refused.allowed, refused.rule, refused.retry_at),
            (False, "smtp_connection_rate", 10.0),
        )
        limiter.smtp_disconnect("203.0.113.5")
        limiter.smtp_disconnect("203.0.113.5")
        self.assertEqual(_keys(metrics), 1)  # the rate bucket only
        clock.advance(10)
        self.assertTrue(limiter.smtp_connect("203.0.113.5").allowed)

    def test_concurrency_refusal_takes_no_rate_token(self) -> None:
        """A connection refused for concurrency does not spend connection-rate tokens."""
        rules = RateLimitRules(
            smtp_connections_per_minute=6,
            smtp_connection_burst=2,
            smtp_concurrent_per_client=1,
        )
        limiter, _ = _limiter(rules)
        self.assertTrue(limiter.smtp_connect("203.0.113.5").allowed)
        self.assertEqual(limiter.smtp_connect("203.0.113.5").rule, "smtp_concurrency")
        self.assertEqual(limiter.smtp_connect("203.0.113.5").rule, "smtp_concurrency")
        limiter.smtp_disconnect("203.0.113.5")
        self.assertTrue(limiter.smtp_connect("203.0.113.5").allowed)

    def test_connect_allow_list(self) -> None:
        """Allow-listed clients are never refused but their sessions are still counted."""
        metrics = _metrics()
        rules = RateLimitRules(
            smtp_connections_per_minute=1,
            smtp_concurrent_per_client=1,
            allow=("127.0.0.0/8",),
        )
        limiter, _ = _limiter(rules, metrics)
        self.assertTrue(all(limiter.smtp_connect("127.0.0.1").allowed for _ in range(20)))
        self.assertEqual(_keys(metrics), 1)
        for _ in range(20):
            limiter.smtp_disconnect("127.0.0.1")
        self.assertEqual(_keys(metrics), 0)

    def test_no_rules_allows_everything(self) -> None:
        """With every SMTP rule off the decisions allow with no rule."""
        limiter, _ = _limiter(RateLimitRules(smtp_concurrent_per_client=None))
        expected = Decision(allowed=True, remaining=0, retry_at=0.0, reset_at=0.0, limit=0, rule=None)
        self.assertEqual(limiter.smtp_connect("203.0.113.5"), expected)
        self.assertEqual(limiter.smtp_message("203.0.113.5", "example.com"), expected)
        self.assertEqual(limiter.smtp_recipient("203.0.113.5", "example.com"), expected)

    def test_message_rate_per_client(self) -> None:
        """Messages are limited per client."""
        limiter, clock = _limiter(RateLimitRules(smtp_messages_per_minute=30, smtp_message_burst=3))
        results = [limiter.smtp_message("203.0.113.5", "example.com") for _ in range(4)]
        self.assertEqual([d.allowed for d in results], [True, True, True, False])
        self.assertEqual((results[3].rule, results[3].retry_at), ("smtp_message_rate", 2.0))
        self.assertTrue(limiter.smtp_message("203.0.113.6", "example.com").allowed)
        clock.advance(2)
        self.assertTrue(limiter.smtp_message("203.0.113.5", None).allowed)

    def test_sender_domain_rate_shared_by_clients(self) -> None:
        """The sender-domain rule counts every client together, case-insensitively."""
        rules = RateLimitRules(smtp_messages_per_minute=60, sender_domain_per_minute=3)
        limiter, _ = _limiter(rules)
        for address, domain in (
            ("203.0.113.5", "example.com"),
            ("203.0.113.6", "EXAMPLE.com"),
            ("::1", "example.com."),
        ):
            decision = limiter.smtp_message(address, domain)
            self.assertTrue(decision.allowed)
        refused = limiter.smtp_message("203.0.113.7", "example.com")
        self.assertEqual(
            (refused.allowed, refused.rule, refused.retry_at),
            (False, "sender_domain_rate", 20.0),
        )
        self.assertTrue(limiter.smtp_message("203.0.113.7", "example.org").allowed)
        self.assertTrue(limiter.smtp_message("203.0.113.7", None).allowed)

    def test_refusal_charges_no_rule(self) -> None:
        """When one rule refuses, no other rule's tokens are spent."""
        rules = RateLimitRules(
            smtp_messages_per_minute=60,
            smtp_message_burst=2,
            sender_domain_per_minute=1,
        )
        limiter, _ = _limiter(rules)
        self.assertTrue(limiter.smtp_message("203.0.113.5", "example.com").allowed)
        for _ in range(5):
            self.assertEqual(
                limiter.smtp_message("203.0.113.5", "example.com").rule,
                "sender_domain_rate",
            )
        self.assertEqual(limiter.smtp_message("203.0.113.5", "example.org").remaining, 0)

    def test_recipient_rates(self) -> None:
        """Recipients are limited per client and per recipient domain."""
        rules = RateLimitRules(
            smtp_recipients_per_minute=60,
            smtp_recipient_burst=3,
            recipient_domain_per_minute=2,
        )
        limiter, _ = _limiter(rules)
        self.assertTrue(limiter.smtp_recipient("203.0.113.5", "a.example").allowed)
        self.assertTrue(limiter.smtp_recipient("203.0.113.5", "a.example").allowed)
        self.assertEqual(
            limiter.smtp_recipient("203.0.113.6", "a.example").rule,
            "recipient_domain_rate",
        )
        self.assertTrue(limiter.smtp_recipient("203.0.113.5", "b.example").allowed)
        self.assertEqual(
            limiter.smtp_recipient("203.0.113.5", "c.example").rule,
            "smtp_recipient_rate",
        )


class LimiterStateTests(SynchronousTestCase):
    """Pruning, the key cap and reloading."""

    def test_prune_on_clock(self) -> None:
        """Buckets idle longer than idle_seconds are dropped once full, on the clock."""
        metrics = _metrics()
        rules = RateLimitRules(http_per_minute=0.5, idle_seconds=600, prune_interval=60)
        limiter, clock = _limiter(rules, metrics)
        limiter.startService()
        limiter.check_http("203.0.113.1")  # nearly full: full again after 120 s
        for _ in range(10):
            limiter.check_http("203.0.113.2")  # empty: full again after 1200 s
        self.assertEqual(_keys(metrics), 2)
        clock.advance(540)
        limiter.check_http("203.0.113.3")
        clock.pump([60] * 1)  # t=600: nothing idle longer than 600 s
        self.assertEqual(_keys(metrics), 3)
        clock.advance(60)  # t=660: .1 idle and full, .2 idle but not full
        self.assertEqual(_keys(metrics), 2)
        clock.pump([60] * 9)  # t=1200: .2 full; .3 idle 660 s and full
        self.assertEqual(_keys(metrics), 0)
        limiter.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_pruned_client_starts_full(self) -> None:
        """A client whose bucket was pruned gets the same burst it would have had."""
        limiter, clock = _limiter()
        limiter.startService()
        for _ in range(10):
            limiter.check_http("203.0.113.5")
        clock.pump([60] * 11)
        self.assertEqual(limiter.check_http("203.0.113.5").remaining, 9)
        limiter.stopService()

    def test_prune_errors_are_logged_and_loop_survives(self) -> None:
        """An error while pruning is logged and pruning goes on at the next tick."""
        limiter, clock = _limiter()
        limiter.startService()
        limiter.check_http("203.0.113.5")

        def boom(bucket: TokenBucket, now: float) -> bool:
            raise ZeroDivisionError("boom")

        self.patch(TokenBucket, "is_full", boom)
        clock.advance(660)
        clock.advance(60)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        limiter.stopService()

    def test_max_keys_evicts_least_recently_used(self) -> None:
        """Over max_keys the least recently used bucket is dropped."""
        metrics = _metrics()
        limiter, _ = _limiter(RateLimitRules(max_keys=3), metrics)
        for address in ("203.0.113.1", "203.0.113.2", "203.0.113.3"):
            for _ in range(10):
                limiter.check_http(address)
        limiter.check_http("203.0.113.1")
        limiter.check_http("203.0.113.4")
        self.assertEqual(_keys(metrics), 3)
        self.assertEqual(limiter.check_http("203.0.113.2").remaining, 9)  # evicted, so fresh
        self.assertFalse(limiter.check_http("203.0.113.1").allowed)
        self.assertEqual(_keys(metrics), 3)

    def test_evictions_reported_at_prune(self) -> None:
        """Evictions are logged once, with their count, at the next prune."""
        limiter, clock = _limiter(RateLimitRules(max_keys=2))
        limiter.startService()
        for i in range(5):
            limiter.check_http(f"203.0.113.{i}")
        with capturedLogs() as events:
            clock.advance(60)
            clock.advance(60)
        evictions = [e for e in events if "evicted" in e["log_format"]]
        self.assertEqual([(e["max_keys"], e["count"]) for e in evictions], [(2, 3)])
        limiter.stopService()

    def test_reload_clamps_and_keeps_tokens(self) -> None:
        """A reload applies new bursts to existing buckets without refilling them."""
        limiter, clock = _limiter()
        for _ in range(5):
            limiter.check_http("203.0.113.5")
        limiter.reload(RateLimitRules(http_burst=3))
        self.assertEqual(limiter.check_http("203.0.113.5").remaining, 2)
        limiter.reload(RateLimitRules(http_burst=20, http_per_minute=6))
        decision = limiter.check_http("203.0.113.5")
        self.assertEqual((decision.remaining, decision.limit), (1, 20))
        limiter.check_http("203.0.113.5")
        self.assertEqual(limiter.check_http("203.0.113.5").retry_at, 10.0)
        clock.advance(10)
        self.assertTrue(limiter.check_http("203.0.113.5").allowed)

    def test_reload_turns_rules_on_and_off(self) -> None:
        """Turning a rule off drops its buckets; turning it on starts limiting."""
        metrics = _metrics()
        limiter, _ = _limiter(
            RateLimitRules(smtp_messages_per_minute=60, smtp_concurrent_per_client=None),
            metrics,
        )
        limiter.smtp_message("203.0.113.5", None)
        self.assertEqual(_keys(metrics), 1)
        limiter.reload(RateLimitRules(smtp_concurrent_per_client=None))
        self.assertEqual(_keys(metrics), 0)
        self.assertIsNone(limiter.smtp_message("203.0.113.5", None).rule)
        limiter.reload(RateLimitRules(allow=("203.0.113.0/24",)))
        self.assertEqual(limiter.check_http("203.0.113.5").remaining, 10)
        self.assertEqual(limiter.rules, RateLimitRules(allow=("203.0.113.0/24",)))

    def test_reload_keeps_open_sessions(self) -> None:
        """Sessions opened before a reload that changes the IPv6 prefix are still released."""
        metrics = _metrics()
        limiter, _ = _limiter(RateLimitRules(smtp_concurrent_per_client=1), metrics)
        self.assertTrue(limiter.smtp_connect("2001:db8:0:1::1").allowed)
        self.assertTrue(limiter.smtp_connect("2001:db8:0:2::1").allowed)
        limiter.reload(RateLimitRules(smtp_concurrent_per_client=1, ipv6_prefix=48))
        self.assertFalse(limiter.smtp_connect("2001:db8:0:3::1").allowed)
        limiter.smtp_disconnect("2001:db8:0:1::1")
        limiter.smtp_disconnect("2001:db8:0:2::1")
        self.assertEqual(_keys(metrics), 0)
        self.assertTrue(limiter.smtp_connect("2001:db8:0:3::1").allowed)

    def test_reload_reschedules_pruning(self) -> None:
        """A new prune interval takes effect on a running service."""
        limiter, clock = _limiter()
        limiter.startService()
        limiter.reload(RateLimitRules(prune_interval=5))
        self.assertEqual([call.getTime() for call in clock.getDelayedCalls()], [5.0])
        limiter.stopService()


class MetricsTests(SynchronousTestCase):
    """Decisions and keys are counted."""

    def test_decisions_counted(self) -> None:
        """Every decision is counted by protocol, rule and outcome."""
        metrics = _metrics()
        rules = RateLimitRules(
            smtp_concurrent_per_client=1,
            smtp_connections_per_minute=60,
            allow=("127.0.0.1/32",),
        )
        limiter, _ = _limiter(rules, metrics)
        for _ in range(12):
            limiter.check_http("203.0.113.5")
        limiter.check_http("127.0.0.1")
        limiter.smtp_connect("203.0.113.5")
        limiter.smtp_connect("203.0.113.5")
        self.assertEqual(_decisions(metrics, "http", "http", "allow"), 11)
        self.assertEqual(_decisions(metrics, "http", "http", "deny"), 2)
        self.assertEqual(_decisions(metrics, "smtp", "smtp_concurrency", "allow"), 1)
        self.assertEqual(_decisions(metrics, "smtp", "smtp_concurrency", "deny"), 1)
        self.assertEqual(_decisions(metrics, "smtp", "smtp_connection_rate", "allow"), 1)
        self.assertIsNone(_decisions(metrics, "smtp", "smtp_connection_rate", "deny"))
        self.assertEqual(_keys(metrics), 3)  # http bucket, connection-rate bucket, one session key


class HeaderTests(SynchronousTestCase):
    """rate_limit_headers."""

    def test_denied(self) -> None:
        """A refusal carries Retry-After and the reset in whole seconds."""
        limiter, _ = _limiter(RateLimitRules(http_per_minute=6, http_burst=2))
        limiter.check_http("203.0.113.5")
        limiter.check_http("203.0.113.5")
        decision = limiter.check_http("203.0.113.5")
        self.assertEqual(
            rate_limit_headers(decision, 0.0),
            {
                "X-RateLimit-Limit": "2",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": "20",
                "Retry-After": "10",
            },
        )

    def test_allowed(self) -> None:
        """A grant has no Retry-After."""
        limiter, _ = _limiter()
        decision = limiter.check_http("203.0.113.5")
        self.assertEqual(
            rate_limit_headers(decision, 0.0),
            {
                "X-RateLimit-Limit": "10",
                "X-RateLimit-Remaining": "9",
                "X-RateLimit-Reset": "1",
            },
        )

    def test_rounding(self) -> None:
        """Seconds are rounded up, float noise below a microsecond is not, Retry-After is at least 1."""
        decision = Decision(allowed=False, remaining=0, retry_at=100.2, reset_at=159.9999999999, limit=5)
        self.assertEqual(
            rate_limit_headers(decision, 100.0),
            {
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": "60",
                "Retry-After": "1",
            },
        )

    def test_never(self) -> None:
        """Infinite times leave their headers out."""
        decision = Decision(allowed=False, remaining=0, retry_at=math.inf, reset_at=math.inf, limit=5)
        self.assertEqual(
            rate_limit_headers(decision, 0.0),
            {"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0"},
        )
