"""Configuration: YAML file + environment + command-line flags, validated.

Precedence: flag > environment > file > built-in default.  One declarative
table (:data:`SPEC`) describes every key: its type, default and meaning.  The
voluptuous schema, the JSON Schema printed by ``gomail validate
--show-schema`` and the defaults all come from it, so they cannot disagree.
Only this module sees dicts: the rest of gomail gets frozen dataclasses.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import voluptuous as vol
import yaml

from gomail.delivery.settings import DeliverySettings, RouteSettings
from gomail.limiter import RateLimitRules
from gomail.smtp.settings import SMTPSettings

# --------------------------------------------------------------------------
# Value types


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.I)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30}


def duration(value: Any) -> float:
    """Seconds from a number or a string such as ``30s``, ``5m``, ``3d``."""
    if isinstance(value, bool):
        raise vol.Invalid("expected a duration such as 30, 30s, 5m, 3d")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise vol.Invalid("a duration must be zero or positive")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise vol.Invalid("expected a duration such as 30, 30s, 5m, 3d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def size(value: Any) -> int:
    """Bytes from a number or a string such as ``25MiB``, ``512k``."""
    if isinstance(value, bool):
        raise vol.Invalid("expected a size such as 26214400 or 25MiB")
    if isinstance(value, int):
        if value < 0:
            raise vol.Invalid("a size must be zero or positive")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise vol.Invalid("expected a size such as 26214400 or 25MiB")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower() or None])


def endpoint(value: Any) -> str:
    """A Twisted server endpoint string such as ``tcp:3000:interface=127.0.0.1``."""
    if not isinstance(value, str) or ":" not in value:
        raise vol.Invalid("expected a Twisted endpoint string such as tcp:3000:interface=127.0.0.1")
    kind = value.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "unix", "ssl", "systemd", "haproxy"):
        raise vol.Invalid(f"unknown endpoint type {kind!r} (tcp, tcp6, unix, ssl, systemd, haproxy)")
    return value


def domain_name(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$", value.strip()):
        raise vol.Invalid("expected a domain name such as example.com")
    return value.strip().lower()


def string_list(value: Any) -> list[str]:
    """A list of strings; a comma-separated string is accepted too (env)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise vol.Invalid("expected a list of strings")
    return value


@dataclass(frozen=True)
class Key:
    """One configuration key: its validator, default, JSON type and meaning."""

    check: Any
    default: Any
    doc: str
    json: dict[str, Any]
    secret: bool = False


def _str(default: str | None, doc: str, *, secret: bool = False) -> Key:
    check = vol.Any(None, str) if default is None else str
    return Key(check, default, doc, {"type": ["string", "null"] if default is None else "string"}, secret)


def _int(default: int | None, doc: str, lo: int = 0, hi: int | None = None) -> Key:
    check = vol.All(vol.Coerce(int), vol.Range(min=lo, max=hi))
    bounds = {"minimum": lo} if hi is None else {"minimum": lo, "maximum": hi}
    if default is None:
        return Key(vol.Any(None, check), None, doc, {"type": ["integer", "null"], **bounds})
    return Key(check, default, doc, {"type": "integer", **bounds})


def _num(default: float | None, doc: str) -> Key:
    check = vol.All(vol.Coerce(float), vol.Range(min=0))
    if default is None:
        return Key(vol.Any(None, check), None, doc, {"type": ["number", "null"], "minimum": 0})
    return Key(check, default, doc, {"type": "number", "minimum": 0})


def _bool(default: bool, doc: str) -> Key:
    return Key(bool, default, doc, {"type": "boolean"})


def _dur(default: float, doc: str) -> Key:
    return Key(duration, default, doc, {"type": ["number", "string"], "description_unit": "seconds or 30s/5m/3d"})


def _size(default: int, doc: str) -> Key:
    return Key(size, default, doc, {"type": ["integer", "string"]})


def _choice(default: str, choices: tuple[str, ...], doc: str) -> Key:
    return Key(vol.In(choices), default, doc, {"type": "string", "enum": list(choices)})


def _list(default: list[str], doc: str, item: Callable[[Any], Any] | None = None, *, secret: bool = False) -> Key:
    check: Any = string_list if item is None else vol.All(string_list, [item])
    return Key(check, default, doc, {"type": "array", "items": {"type": "string"}}, secret)


SMTP_DEFAULTS = SMTPSettings()
LIMIT_DEFAULTS = RateLimitRules()
DELIVERY_DEFAULTS = DeliverySettings()

ROUTE_SPEC: dict[str, Key] = {
    "name": Key(vol.All(str, vol.Match(r"^[A-Za-z0-9_.-]{1,64}$")), vol.UNDEFINED, "Route name (metrics label).", {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}),
    "match": _list([], "Recipients this route takes: user@example.com, *@example.com, or * (catch-all). user+tag@d matches user@d."),
    "url": Key(vol.All(str, vol.Match(r"^https?://")), vol.UNDEFINED, "Webhook URL (http or https).", {"type": "string", "pattern": "^https?://"}),
    "secrets": _list([], "Signing secrets (whsec_<base64> or plain); several while rotating keys.", secret=True),
    "raw": _choice("never", ("never", "base64", "multipart"), "Include the raw MIME: never, base64 in the JSON, or as a separate multipart part."),
    "inline_attachments_max": _size(0, "Attachments up to this size are inlined as base64; larger ones are metadata only."),
    "fan_out": _choice("message", ("message", "recipient"), "One payload per message and route, or one per recipient."),
    "timeout": _dur(30.0, "Per-request timeout."),
    "concurrency": _int(4, "Requests in flight to this route at once.", 1),
}

SPEC: dict[str, Any] = {
    "hostname": _str("localhost", "Name in the SMTP greeting, EHLO reply and Received headers."),
    "data_dir": _str("./var/gomail", "The spool folder (created if missing)."),
    "domains": _list(["localhost"], "Recipient domains accepted at all (no relaying for anything else).", domain_name),
    "shutdown_timeout": _dur(30.0, "Longest graceful drain on SIGTERM/SIGINT before connections are cut."),
    "io_threads": _int(4, "Threads for file I/O (the reactor thread never blocks).", 1),
    "parser_processes": _int(None, "Processes that parse messages after acceptance (default: CPUs - 1, at least 1; 0 = parse in threads)."),
    "parser_nice": _int(19, "CPU niceness of the parser processes (0-19, never below the daemon's own): 19 lets acceptance go first during a burst; lower it on a host shared with busy programs.", 0, 19),
    "http": {
        "listen": Key(endpoint, "tcp:3000:interface=127.0.0.1", "HTTP API endpoint (Twisted endpoint string).", {"type": "string"}),
        "bearer_token": _str(None, "Bearer token for the API; generated into data_dir/http-token on first start when unset.", secret=True),
        "allow_weak_token": _bool(False, "Accept a short, placeholder or low-entropy token (tests only)."),
        "max_body_size": _size(26214400, "Largest request body; bigger requests get 413."),
        "metrics": _bool(True, "Serve /metrics on the API listener (without a token)."),
        "request_timeout": _dur(300.0, "Time allowed for a whole request, body included."),
    },
    "smtp": {
        "enabled": _bool(True, "Run the SMTP listener."),
        "listen": Key(endpoint, "tcp:2525:interface=127.0.0.1", "SMTP endpoint (port 25 in production).", {"type": "string"}),
        "max_message_size": _size(SMTP_DEFAULTS.max_message_size, "Largest message (SIZE); bigger ones get 552 5.3.4."),
        "max_recipients": _int(SMTP_DEFAULTS.max_recipients, "Recipients per message; more get 452 4.5.3.", 1),
        "max_line_length": _int(SMTP_DEFAULTS.max_line_length, "Longest command line.", 64),
        "max_data_line_length": _int(SMTP_DEFAULTS.max_data_line_length, "Longest message line (RFC 5322: 1000 with CRLF).", 78),
        "long_line_policy": _choice(SMTP_DEFAULTS.long_line_policy, ("reject", "wrap", "accept"), "What to do with a message line over the limit."),
        "bare_newline_policy": _choice(SMTP_DEFAULTS.bare_newline_policy, ("reject", "normalize"), "Bare LF/CR in DATA: reject (550 5.6.11) or normalise to CRLF."),
        "idle_timeout": _dur(SMTP_DEFAULTS.idle_timeout, "Time allowed between commands; then 421 4.4.2."),
        "data_timeout": _dur(SMTP_DEFAULTS.data_timeout, "Time allowed for one DATA/BDAT transfer."),
        "junk_command_limit": _int(SMTP_DEFAULTS.junk_command_limit, "Bad commands before 421 4.7.0.", 1),
        "max_idle_commands": _int(SMTP_DEFAULTS.max_idle_commands, "NOOP/RSET/VRFY/HELP/HELO/EHLO allowed between accepted messages; past it each counts as a bad command.", 1),
        "max_sessions": _int(SMTP_DEFAULTS.max_sessions, "Concurrent SMTP sessions in total.", 1),
        "max_header_bytes": _size(SMTP_DEFAULTS.max_header_bytes, "Largest header section."),
        "tls": {
            "certificate": _str(None, "PEM file: the server's certificate, then its intermediates (fullchain.pem). Set, STARTTLS is offered; re-read on SIGHUP."),
            "private_key": _str(None, "PEM file with the certificate's private key, unencrypted (default: the certificate file)."),
        },
    },
    "rate_limit": {
        "per_minute": _num(LIMIT_DEFAULTS.http_per_minute, "HTTP requests per minute per client."),
        "burst": _int(LIMIT_DEFAULTS.http_burst, "HTTP burst per client.", 1),
        "allow": _list([], "Networks (CIDR) never limited, e.g. the local MTA."),
        "trusted_proxies": _list([], "Proxies whose X-Forwarded-For names the real client."),
        "ipv6_prefix": _int(LIMIT_DEFAULTS.ipv6_prefix, "IPv6 clients are keyed by this prefix length.", 1),
        "max_keys": _int(LIMIT_DEFAULTS.max_keys, "Most clients tracked at once (oldest evicted).", 100),
        "idle_timeout": _dur(LIMIT_DEFAULTS.idle_seconds, "Buckets idle this long are pruned."),
        "tarpit": _dur(LIMIT_DEFAULTS.tarpit_seconds, "Delay before an SMTP rate-limit reply."),
        "smtp_connections_per_minute": _num(None, "SMTP connections per minute per client (off when null)."),
        "smtp_concurrent_per_client": _int(LIMIT_DEFAULTS.smtp_concurrent_per_client, "Concurrent SMTP sessions per client."),
        "smtp_messages_per_minute": _num(None, "Messages per minute per client (off when null)."),
        "smtp_recipients_per_minute": _num(None, "Recipients per minute per client (off when null)."),
        "sender_domain_per_minute": _num(None, "Messages per minute per sender domain (off when null)."),
        "recipient_domain_per_minute": _num(None, "Recipients per minute per recipient domain (off when null)."),
    },
    "routes": [ROUTE_SPEC],
    "delivery": {
        "max_age": _dur(DELIVERY_DEFAULTS.max_age, "Retry for this long, then dead-letter."),
        "first_retry": _dur(DELIVERY_DEFAULTS.first_retry, "First retry delay (exponential with full jitter after)."),
        "max_backoff": _dur(DELIVERY_DEFAULTS.max_backoff, "Longest delay between attempts."),
        "concurrency": _int(DELIVERY_DEFAULTS.concurrency, "Webhook requests in flight overall.", 1),
        "max_persistent_per_host": _int(DELIVERY_DEFAULTS.max_persistent_per_host, "Idle keep-alive connections kept per host.", 1),
        "pool_idle_timeout": _dur(DELIVERY_DEFAULTS.pool_idle_timeout, "Idle pooled connections are closed after this."),
        "connect_timeout": _dur(DELIVERY_DEFAULTS.connect_timeout, "TCP connect timeout."),
        "block_private_addresses": _bool(DELIVERY_DEFAULTS.block_private_addresses, "Refuse webhook URLs resolving to private, loopback or link-local addresses."),
    },
    "logging": {
        "format": _choice("json", ("json", "text"), "JSON lines or human-readable text."),
        "level": _choice("info", ("debug", "info", "warn", "error"), "Lowest level logged."),
    },
}

#: GoMail's flat keys: old name -> (new path, converter)
LEGACY_KEYS: dict[str, tuple[tuple[str, ...], Callable[[Any], Any]]] = {
    "port": (("http", "listen"), lambda v: f"tcp:{int(v)}:interface=127.0.0.1"),
    "bearer_token": (("http", "bearer_token"), str),
    "data_dir": (("data_dir",), str),
    "rate_limit_per_minute": (("rate_limit", "per_minute"), lambda v: v),
    "rate_limit_burst": (("rate_limit", "burst"), lambda v: v),
    "mail_hostname": (("hostname",), str),
    "primary_domain": (("domains",), lambda v: [v] if isinstance(v, str) else v),
}
LEGACY_ENV = {f"MAIL_{k.upper()}": k for k in LEGACY_KEYS}

WEAK_TOKENS = {
    "change-this-to-a-secure-token",
    "change-me",
    "changeme",
    "your-secret-token",
    "your-token-here",
    "secret",
    "password",
    "token",
    "test",
    "example",
}


# --------------------------------------------------------------------------
# Frozen config objects


@dataclass(frozen=True, slots=True)
class HTTPConfig:
    listen: str
    bearer_token: str | None
    allow_weak_token: bool
    max_body_size: int
    metrics: bool
    request_timeout: float


@dataclass(frozen=True, slots=True)
class SMTPConfig:
    enabled: bool
    listen: str
    settings: SMTPSettings
    tls_certificate: str | None = None
    tls_private_key: str | None = None


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: str
    level: str


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    hostname: str
    data_dir: str
    domains: tuple[str, ...]
    shutdown_timeout: float
    io_threads: int
    parser_processes: int | None
    parser_nice: int
    http: HTTPConfig
    smtp: SMTPConfig
    rate_limit: RateLimitRules
    routes: tuple[RouteSettings, ...]
    delivery: DeliverySettings
    logging: LoggingConfig
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def with_token(self, token: str) -> Config:
        """A copy with the HTTP bearer token set (a generated one)."""
        from dataclasses import replace

        return replace(self, http=replace(self.http, bearer_token=token))


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` lists ``(path, message)``."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{p}: {m}" for p, m in errors))
        self.errors = errors


# --------------------------------------------------------------------------
# Schema generation


def _voluptuous(spec: Any) -> Any:
    if isinstance(spec, Key):
        return spec.check
    if isinstance(spec, list):
        return [_voluptuous(spec[0])]
    out: dict[Any, Any] = {}
    for name, sub in spec.items():
        required = isinstance(sub, Key) and sub.default is vol.UNDEFINED
        out[vol.Required(name) if required else vol.Optional(name)] = _voluptuous(sub) if not isinstance(sub, dict) else vol.Schema(_voluptuous(sub), extra=vol.PREVENT_EXTRA)
    return out


SCHEMA = vol.Schema(_voluptuous(SPEC), extra=vol.PREVENT_EXTRA)


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of the whole configuration."""

    def convert(spec: Any) -> dict[str, Any]:
        if isinstance(spec, Key):
            out = dict(spec.json)
            out.pop("description_unit", None)
            out["description"] = spec.doc
            if spec.default is not vol.UNDEFINED:
                out["default"] = spec.default
            if spec.secret:
                out["writeOnly"] = True
            return out
        if isinstance(spec, list):
            return {"type": "array", "items": convert(spec[0])}
        required = [k for k, v in spec.items() if isinstance(v, Key) and v.default is vol.UNDEFINED]
        obj: dict[str, Any] = {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: convert(v) for k, v in spec.items()},
        }
        if required:
            obj["required"] = required
        return obj

    schema = convert(SPEC)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "gomail configuration"
    return schema


def _defaults(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, sub in spec.items():
        if isinstance(sub, dict):
            out[name] = _defaults(sub)
        elif isinstance(sub, list):
            out[name] = []
        elif sub.default is not vol.UNDEFINED:
            out[name] = list(sub.default) if isinstance(sub.default, list) else sub.default
    return out


def _spec_at(path: tuple[str, ...]) -> Any:
    node: Any = SPEC
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# --------------------------------------------------------------------------
# Loading


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_path(target: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = target
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return
    node[path[-1]] = value


def _scalar(text: str) -> Any:
    """An environment or flag value: YAML scalars, so 60, true, [a, b] work."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def read_file(path: str) -> dict[str, Any]:
    """The YAML document at ``path`` (an empty file is an empty mapping)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError([(path, f"cannot read: {e.strerror}")]) from e
    except yaml.YAMLError as e:
        raise ConfigError([(path, f"not valid YAML: {e}")]) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([(path, "the top level must be a mapping")])
    return data


def _apply_legacy(data: dict[str, Any], warnings: list[str], origin: str) -> dict[str, Any]:
    out = {k: v for k, v in data.items() if k not in LEGACY_KEYS or k == "data_dir"}
    for old, (path, convert) in LEGACY_KEYS.items():
        if old in data and old != "data_dir":
            warnings.append(f"{origin}: '{old}' is GoMail's name and is deprecated; use '{'.'.join(path)}'")
            try:
                value = convert(data[old])
            except (TypeError, ValueError):
                value = data[old]
            _set_path(out, path, value)
    return out


def from_environment(environ: Mapping[str, str], warnings: list[str]) -> dict[str, Any]:
    """Settings from ``GOMAIL_A__B`` variables and GoMail's ``MAIL_*`` ones."""
    out: dict[str, Any] = {}
    legacy: dict[str, Any] = {}
    for name, text in sorted(environ.items()):
        if name.startswith("GOMAIL_") and name != "GOMAIL_CONFIG":
            path = tuple(p.lower() for p in name[len("GOMAIL_") :].split("__"))
            _set_path(out, path, _scalar(text) if not _is_secret(path) else text)
        elif name in LEGACY_ENV:
            key = LEGACY_ENV[name]
            legacy[key] = text if key in ("bearer_token", "data_dir", "mail_hostname", "primary_domain") else _scalar(text)
            if key == "data_dir":
                warnings.append(f"environment: '{name}' is GoMail's name and is deprecated; use GOMAIL_DATA_DIR")
    return _merge(_apply_legacy(legacy, warnings, "environment"), out)


def _is_secret(path: tuple[str, ...]) -> bool:
    spec = _spec_at(path)
    return isinstance(spec, Key) and spec.secret


def weak_token_reason(token: str) -> str | None:
    """Why a bearer token is weak, or None when it is strong enough."""
    if token.strip().lower() in WEAK_TOKENS or "change" in token.lower() and "token" in token.lower():
        return "it is a known placeholder"
    if len(token) < 32:
        return f"it is {len(token)} characters long; at least 32 are required"
    counts: dict[str, int] = {}
    for ch in token:
        counts[ch] = counts.get(ch, 0) + 1
    entropy = -sum(c / len(token) * math.log2(c / len(token)) for c in counts.values())
    if len(counts) < 10 or entropy < 3.0:
        return f"it has too little variety ({len(counts)} distinct characters, {entropy:.1f} bits each)"
    return None


def load(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Load, merge and validate; raises :class:`ConfigError` with every error."""
    warnings: list[str] = []
    file_data = _apply_legacy(read_file(path), warnings, path) if path else {}
    env_data = from_environment(os.environ if environ is None else environ, warnings)
    merged = _merge(_merge(_defaults(SPEC), file_data), env_data)
    for dotted, value in (flags or {}).items():
        _set_path(merged, tuple(dotted.split(".")), value)
    return validate(merged, warnings)


def validate(data: dict[str, Any], warnings: list[str] | None = None) -> Config:
    """Validate merged settings into a :class:`Config`."""
    warnings = list(warnings or [])
    errors: list[tuple[str, str]] = []
    clean: dict[str, Any] | None = None
    try:
        clean = SCHEMA(data)
    except vol.MultipleInvalid as e:
        errors += [(_path(err.path), _message(err)) for err in e.errors]
    errors += _semantic_errors(clean if clean is not None else data)
    if errors:
        raise ConfigError(sorted(set(errors)))
    assert clean is not None
    return _build(clean, tuple(warnings))


def _semantic_errors(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Checks beyond types; run on raw data too, so one run reports all."""
    errors: list[tuple[str, str]] = []
    http: dict[str, Any] = data["http"] if isinstance(data.get("http"), dict) else {}
    token = http.get("bearer_token")
    if isinstance(token, str) and http.get("allow_weak_token") is not True:
        reason = weak_token_reason(token)
        if reason:
            errors.append(("http.bearer_token", f"the token is weak: {reason} (set http.allow_weak_token: true to accept it)"))
    errors += _tls_errors(data)
    routes: list[Any] = data["routes"] if isinstance(data.get("routes"), list) else []
    names = [r.get("name") for r in routes if isinstance(r, dict)]
    for i, r in enumerate(routes):
        if not isinstance(r, dict):
            continue
        if r.get("name") is not None and names.index(r.get("name")) != i:
            errors.append((f"routes[{i}].name", f"duplicate route name {r.get('name')!r}"))
        if "match" in r and not r.get("match"):
            errors.append((f"routes[{i}].match", "a route needs at least one match"))
    return errors


def _tls_errors(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The SMTP certificate and key must load and belong together."""
    smtp: Any = data.get("smtp")
    tls: Any = smtp.get("tls") if isinstance(smtp, dict) else None
    if not isinstance(tls, dict):
        return []
    certificate, key = tls.get("certificate"), tls.get("private_key")
    if certificate is None:
        return [("smtp.tls.private_key", "a private key needs smtp.tls.certificate too")] if key is not None else []
    if not isinstance(certificate, str) or not isinstance(key, str | None):
        return []  # the schema reports the types
    from gomail.smtp.tls import TLSFilesError, load_server_tls

    try:
        load_server_tls(certificate, key)
    except TLSFilesError as e:
        return [("smtp.tls.certificate", str(e))]
    return []


def _path(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _message(err: vol.Invalid) -> str:
    if err.error_message == "extra keys not allowed":
        return "unknown key (typo?)"
    if err.error_message == "required key not provided":
        return "required key missing"
    return err.error_message


def _build(c: dict[str, Any], warnings: tuple[str, ...]) -> Config:
    s, rl, d = c["smtp"], c["rate_limit"], c["delivery"]
    smtp = SMTPSettings(
        hostname=c["hostname"],
        max_message_size=s["max_message_size"],
        max_recipients=s["max_recipients"],
        max_line_length=s["max_line_length"],
        max_data_line_length=s["max_data_line_length"],
        long_line_policy=s["long_line_policy"],
        bare_newline_policy=s["bare_newline_policy"],
        idle_timeout=s["idle_timeout"],
        data_timeout=s["data_timeout"],
        junk_command_limit=s["junk_command_limit"],
        max_idle_commands=s["max_idle_commands"],
        max_sessions=s["max_sessions"],
        max_header_bytes=s["max_header_bytes"],
        tarpit_seconds=rl["tarpit"],
    )
    rules = RateLimitRules(
        http_per_minute=rl["per_minute"],
        http_burst=rl["burst"],
        smtp_connections_per_minute=rl["smtp_connections_per_minute"],
        smtp_concurrent_per_client=rl["smtp_concurrent_per_client"],
        smtp_messages_per_minute=rl["smtp_messages_per_minute"],
        smtp_recipients_per_minute=rl["smtp_recipients_per_minute"],
        sender_domain_per_minute=rl["sender_domain_per_minute"],
        recipient_domain_per_minute=rl["recipient_domain_per_minute"],
        allow=tuple(rl["allow"]),
        trusted_proxies=tuple(rl["trusted_proxies"]),
        ipv6_prefix=rl["ipv6_prefix"],
        max_keys=rl["max_keys"],
        idle_seconds=rl["idle_timeout"],
        tarpit_seconds=rl["tarpit"],
    )
    routes = tuple(
        RouteSettings(
            name=r["name"],
            match=tuple(x.lower() for x in r["match"]),
            url=r["url"],
            secrets=tuple(r.get("secrets", ())),
            raw=r.get("raw", "never"),
            inline_attachments_max=r.get("inline_attachments_max", 0),
            fan_out=r.get("fan_out", "message"),
            timeout=r.get("timeout", 30.0),
            concurrency=r.get("concurrency", 4),
        )
        for r in c["routes"]
    )
    delivery = DeliverySettings(
        max_age=d["max_age"],
        first_retry=d["first_retry"],
        max_backoff=d["max_backoff"],
        concurrency=d["concurrency"],
        max_persistent_per_host=d["max_persistent_per_host"],
        pool_idle_timeout=d["pool_idle_timeout"],
        connect_timeout=d["connect_timeout"],
        block_private_addresses=d["block_private_addresses"],
    )
    h = c["http"]
    return Config(
        hostname=c["hostname"],
        data_dir=c["data_dir"],
        domains=tuple(c["domains"]),
        shutdown_timeout=c["shutdown_timeout"],
        io_threads=c["io_threads"],
        parser_processes=c["parser_processes"],
        parser_nice=c["parser_nice"],
        http=HTTPConfig(h["listen"], h.get("bearer_token"), h["allow_weak_token"], h["max_body_size"], h["metrics"], h["request_timeout"]),
        smtp=SMTPConfig(s["enabled"], s["listen"], smtp, s["tls"]["certificate"], s["tls"]["private_key"]),
        rate_limit=rules,
        routes=routes,
        delivery=delivery,
        logging=LoggingConfig(c["logging"]["format"], c["logging"]["level"]),
        warnings=warnings,
    )


def masked(data: Any, spec: Any = SPEC) -> Any:
    """A printable copy of merged settings with every secret masked."""
    if isinstance(spec, dict) and isinstance(data, dict):
        return {k: masked(v, spec.get(k)) for k, v in data.items()}
    if isinstance(spec, list) and isinstance(data, list):
        return [masked(v, spec[0]) for v in data]
    if isinstance(spec, Key) and spec.secret and data:
        return ["********"] * len(data) if isinstance(data, list) else "********"
    return data


def describe(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, secrets masked."""
    from dataclasses import asdict

    out = asdict(config)
    out.pop("warnings", None)
    if out["http"]["bearer_token"]:
        out["http"]["bearer_token"] = "********"
    for r in out["routes"]:
        r["secrets"] = ["********"] * len(r["secrets"])
    return out
