"""Turn raw RFC 5322 / MIME bytes into a JSON-ready dict for the webhook body.

Entry points:

* :func:`parse_message` walks the whole message: headers, addresses, date,
  ids, the text and HTML bodies and the attachments (after acceptance, in
  the parser processes).
* :func:`parse_header_summary` reads only the header section, with full
  decoding (about 0.4 ms a message).
* :func:`header_addresses` only pulls addresses out of named headers; it is
  the one cheap enough for the reply path.

Both use the stdlib :mod:`email` package with the modern policy and never
raise: whatever goes wrong is recorded as a string in ``defects``.

Bounding the work.  The stdlib parser is correct but can be made slow:

* The feed parser checks every line against every enclosing boundary and
  re-parses a parent's Content-Type for every child, so deep or wide MIME
  trees cost minutes.  :class:`_BoundedMessage`, the message factory handed to
  the parser, stops it from splitting multiparts deeper than ``max_depth``,
  stops the parse once ``max_parts`` parts exist (keeping what was parsed),
  and parses each header of a part once instead of on every lookup.
* ``message/*`` parts are never parsed into: a forwarded message is an
  attachment whose bytes are its original bytes.
* The modern header parser is quadratic on some inputs (100 KB of ``"a``
  in a To header takes over a minute).  Every header value handed to it is
  capped in length, and in total per message (the ``_MAX_*`` constants);
  past a cap the value is skipped or kept undecoded, with a defect.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.headerregistry import AddressHeader, BaseHeader, DateHeader, HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from email.policy import EmailPolicy
from email.utils import getaddresses, parsedate_to_datetime
from functools import partial
from typing import Any

__all__ = ["header_addresses", "parse_header_summary", "parse_message"]

#: Address headers reported by :func:`parse_message`, as (result key, header name).
_ADDRESS_FIELDS: tuple[tuple[str, str], ...] = (
    ("from", "from"),
    ("to", "to"),
    ("cc", "cc"),
    ("bcc", "bcc"),
    ("reply_to", "reply-to"),
    ("sender", "sender"),
)
#: Headers the stdlib parses to find the MIME structure.
_MIME_HEADERS = frozenset({"content-type", "content-disposition", "content-transfer-encoding"})

#: Longest MIME header value kept; longer ones are cut (RFC 2045 headers are short).
_MAX_MIME_HEADER = 2048
#: Most characters of MIME headers in one message, all parts together.
_MAX_MIME_HEADER_TOTAL = 128 * 1024
#: Longest single address (one comma-separated entry, or one group) parsed.
_MAX_ADDRESS = 1024
#: Most characters of address headers parsed per message, all of them together.
_MAX_ADDRESS_TOTAL = 32 * 1024
#: Longest header value whose RFC 2047 encoded words are decoded.
_MAX_DECODED_HEADER = 8192
#: Most characters of headers with encoded words decoded per message.
_MAX_DECODED_TOTAL = 64 * 1024
#: Longest Date value parsed.
_MAX_DATE = 256
#: Longest charset name quoted back in a defect string.
_MAX_NAME_IN_DEFECT = 64

#: A blank line: the end of the header section.
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
#: One ``<...>`` message id.
_MSG_ID = re.compile(r"<[^<>]*>")
#: Any UTF-16 surrogate: never valid in UTF-8 output.
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Surrogate-escaped bytes that are not UTF-8, read as Windows-1252 (what
#: senders of raw 8-bit headers almost always mean); its five unassigned
#: bytes become U+FFFD.
_ESCAPED_BYTE_AS_CP1252: dict[int, str] = {0xDC00 + b: bytes([b]).decode("cp1252", "replace") for b in range(0x80, 0x100)}
#: Charset labels that promise ASCII; their 8-bit bytes are read as UTF-8.
_ASCII_LABELS = frozenset({"us-ascii", "ascii", "ansi_x3.4-1968", "iso646-us", "us"})
#: Marks a header looked up and found absent.
_ABSENT = object()


def _repair(value: str) -> str:
    """Make a string from the email package safe to encode as UTF-8.

    ``BytesParser`` keeps non-ASCII bytes as surrogate escapes.  Runs that
    are valid UTF-8 (RFC 6532 headers) are decoded as UTF-8, any other
    escaped byte as Windows-1252, and any other lone surrogate becomes
    U+FFFD.

    Args:
        value: Text that may hold surrogates.

    Returns:
        The same text without surrogates.
    """
    if value.isascii():
        return value
    try:
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        pass
    return _SURROGATE.sub("\ufffd", value.translate(_ESCAPED_BYTE_AS_CP1252))


def _unfold(value: str) -> str:
    """Remove the line breaks of a folded header value.

    Args:
        value: A raw header value.

    Returns:
        The value on one line (the folding whitespace stays).
    """
    return value.replace("\r", "").replace("\n", "")


class _LenientPolicy(EmailPolicy):
    """``email.policy.default`` that repairs raw 8-bit header bytes on input.

    The stock policy turns every non-UTF-8 byte of a header into U+FFFD when
    the header is read; repairing the source value first keeps the Latin-1
    and Windows-1252 headers that old clients and much spam still send.
    """

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        """Split a raw header into name and value, repairing escaped bytes.

        Args:
            sourcelines: The header's physical lines, as the parser read them.

        Returns:
            ``(name, value)`` with surrogate escapes decoded.
        """
        name, value = super().header_source_parse(sourcelines)
        return _repair(name), _repair(value)


class _HeaderClasses(HeaderRegistry):
    """The stock header registry, with its classes made once.

    ``HeaderRegistry`` builds a new class with ``type()`` every time a header
    is read; that was about a tenth of the time spent parsing a message.
    """

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[type, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        # Keyed by the specialised class, not the name: names come from the
        # message, the classes are a fixed few.
        cls = self.registry.get(name.lower(), self.default_class)
        made = self._made.get(cls)
        if made is None:
            made = self._made[cls] = type("_" + cls.__name__, (cls, self.base_class), {})
        return made


_POLICY = _LenientPolicy(header_factory=_HeaderClasses())


class _UnstructuredHeader(UnstructuredHeader, BaseHeader):
    """A header read as unstructured text: encoded words decoded, nothing dropped."""

    @classmethod
    def parse(cls, value: str, kwds: dict[str, Any]) -> None:
        """Parse ``value``, keeping the defects the stock class drops.

        ``UnstructuredHeader`` leaves the defects of its parse tree (bad
        base64, unknown charsets in encoded words) out of ``defects``.

        Args:
            value: The unfolded header value.
            kwds: The header's attributes, filled in place.
        """
        super().parse(value, kwds)
        kwds["defects"].extend(getattr(kwds.get("parse_tree"), "all_defects", ()))


class _BudgetExhausted(Exception):
    """Raised inside the feed parser to stop it; what was parsed is kept."""


@dataclass(slots=True)
class _Budget:
    """The limits of one call, what has been spent, and which limits were hit."""

    max_depth: int = 20
    max_parts: int = 500
    parts: int = 1
    mime_header_chars: int = 0
    address_chars: int = 0
    decoded_chars: int = 0
    root: _BoundedMessage | None = None
    exceeded: list[str] = field(default_factory=list)

    def note(self, limit: str) -> None:
        """Record that a limit was hit.

        Args:
            limit: The defect string naming the limit.
        """
        if limit not in self.exceeded:
            self.exceeded.append(limit)


class _BoundedMessage(EmailMessage):
    """An ``EmailMessage`` that keeps the feed parser inside a :class:`_Budget`.

    The feed parser creates one of these per part, stores each header with
    ``set_raw``, attaches each part to its parent, and asks
    ``get_content_maintype()`` whether to parse a body as a multipart or a
    message.  Overriding those methods is the only way to bound the stdlib
    parser's work without rewriting it.  ``get_content_type()`` still reports
    the true type.  Headers are never changed after parsing, which lets
    ``get`` parse each one once.
    """

    def __init__(self, policy: EmailPolicy | None = None, *, budget: _Budget) -> None:
        """Create an empty part.

        Args:
            policy: The parse policy.
            budget: The limits of this parse.
        """
        super().__init__(policy=policy)
        self.gomail_depth = 0
        self.gomail_budget = budget
        self.gomail_incomplete = False
        self._gomail_parsed: dict[str, Any] = {}

    def set_raw(self, name: str, value: str) -> None:
        """Store a header as parsed, cutting MIME headers to their limits.

        Args:
            name: The header name.
            value: The raw value.

        Raises:
            _BudgetExhausted: The message's MIME headers are too long in total
                (at the top level, the extra headers are dropped instead).
        """
        if name.lower() in _MIME_HEADERS:
            budget = self.gomail_budget
            if len(value) > _MAX_MIME_HEADER:
                budget.note("mime header too long")
                value = value[:_MAX_MIME_HEADER]
            budget.mime_header_chars += len(value)
            if budget.mime_header_chars > _MAX_MIME_HEADER_TOTAL:
                budget.note("mime header budget exceeded")
                if self.gomail_depth == 0:
                    return
                self.gomail_incomplete = True
                raise _BudgetExhausted()
        self._gomail_parsed.clear()
        super().set_raw(name, value)

    def get(self, name: str, failobj: Any = None) -> Any:
        """Return the first header called ``name``, parsing it at most once.

        A header that makes the stdlib header parser raise is returned as
        unstructured text (and noted), so one bad header cannot stop the parse;
        the stdlib's ``get_param`` and friends then parse its text the legacy way.

        Args:
            name: The header name, any case.
            failobj: What to return if there is no such header.

        Returns:
            The parsed header, or ``failobj``.
        """
        key = name.lower()
        found = self._gomail_parsed.get(key)
        if found is None:
            try:
                found = super().get(key, _ABSENT)
            except Exception:  # a header parser bug: fall back to plain text
                self.gomail_budget.note(f"unparseable header: {key[:_MAX_NAME_IN_DEFECT]}")
                found = self._unstructured_get(key)
            self._gomail_parsed[key] = found
        return failobj if found is _ABSENT else found

    def _unstructured_get(self, key: str) -> Any:
        """Return the first header called ``key`` read as unstructured text.

        Args:
            key: A lower-case header name that is present.

        Returns:
            The header, or ``_ABSENT`` if even that fails.
        """
        for name, value in self.raw_items():
            if name.lower() == key:
                try:
                    return _UnstructuredHeader(name, _unfold(value))
                except Exception:  # nothing simpler to try
                    return _ABSENT
        return _ABSENT

    def attach(self, payload: Message | str) -> None:
        """Attach a child part, counting it against ``max_parts``.

        Args:
            payload: The child part.

        Raises:
            _BudgetExhausted: The message already has ``max_parts`` parts.
        """
        budget = self.gomail_budget
        if budget.root is None and self.gomail_depth == 0:
            budget.root = self
        if budget.parts >= budget.max_parts:
            budget.note("max_parts exceeded")
            raise _BudgetExhausted()
        budget.parts += 1
        if isinstance(payload, _BoundedMessage):
            payload.gomail_depth = self.gomail_depth + 1
        super().attach(payload)  # type: ignore[arg-type]  # MIMEPart's stub wants Self

    def get_content_maintype(self) -> str:
        """Return the main type, or ``application`` for a body not to parse into.

        Returns:
            The main content type; ``application`` for ``message/*`` and for a
            multipart at ``max_depth``, so the parser keeps its body as bytes.
        """
        maintype = super().get_content_maintype()
        if maintype == "message":
            return "application"
        if maintype == "multipart" and self.gomail_depth >= self.gomail_budget.max_depth:
            self.gomail_budget.note("max_depth exceeded")
            return "application"
        return maintype


class _Defects:
    """An ordered list of defect strings without duplicates."""

    def __init__(self) -> None:
        """Start empty."""
        self._items: list[str] = []

    def add(self, defect: str) -> None:
        """Record one defect.

        Args:
            defect: A defect class name or a short description.
        """
        if defect not in self._items:
            self._items.append(defect)

    def add_from(self, defects: Any) -> None:
        """Record the class names of the email package's defect objects.

        Args:
            defects: An iterable of defects, such as a part's ``defects``.
        """
        for defect in defects:
            self.add(type(defect).__name__)

    def as_list(self) -> list[str]:
        """Return the defects recorded so far, in order.

        Returns:
            A new list of strings.
        """
        return list(self._items)


@dataclass(slots=True)
class _Bodies:
    """What the part walk has found so far."""

    texts: list[str] = field(default_factory=list)
    text_charset: str | None = None
    html: str | None = None
    html_charset: str | None = None
    attachments: list[dict[str, Any]] = field(default_factory=list)


def _empty_result() -> dict[str, Any]:
    """Return the result of a message with nothing in it.

    Returns:
        A dict with every key of :func:`parse_message`'s result.
    """
    return {
        "headers": [],
        "subject": None,
        "from": [],
        "to": [],
        "cc": [],
        "bcc": [],
        "reply_to": [],
        "sender": [],
        "date": None,
        "message_id": None,
        "in_reply_to": None,
        "references": [],
        "text": None,
        "html": None,
        "charsets": {"text": None, "html": None},
        "attachments": [],
        "defects": [],
    }


def parse_message(
    raw: bytes,
    *,
    max_depth: int = 20,
    max_parts: int = 500,
    max_headers: int = 1000,
    inline_attachment_limit: int = 0,
) -> dict[str, Any]:
    """Parse a raw message into a JSON-serialisable dict.

    Never raises: problems are listed in ``defects`` (email package defect
    class names and our own short descriptions).

    Args:
        raw: The message as received, headers and body.
        max_depth: Deepest multipart nesting parsed (the top level is 0);
            deeper multiparts are skipped with the defect ``max_depth exceeded``.
        max_parts: Most MIME parts parsed and walked, containers included;
            parsing stops there with the defect ``max_parts exceeded``.
        max_headers: Most entries in ``headers``.
        inline_attachment_limit: Attachments of 1 to this many decoded bytes
            carry their content in base64; 0 never includes content.

    Returns:
        A dict with the keys ``headers``, ``subject``, ``from``, ``to``, ``cc``,
        ``bcc``, ``reply_to``, ``sender``, ``date``, ``message_id``,
        ``in_reply_to``, ``references``, ``text``, ``html``, ``charsets``,
        ``attachments`` and ``defects``.
    """
    result = _empty_result()
    defects = _Defects()
    budget = _Budget(max_depth=max_depth, max_parts=max_parts)
    try:
        _parse_into(result, defects, budget, bytes(raw), max_headers, inline_attachment_limit)
    except Exception as exc:  # the contract is to never raise
        defects.add(f"parse error: {type(exc).__name__}")
    for limit in budget.exceeded:
        defects.add(limit)
    result["defects"] = defects.as_list()
    return result


def parse_header_summary(raw: bytes, *, max_header_bytes: int = 1048576) -> dict[str, Any]:
    """Read the subject, message id and main addresses from the header section.

    Looks only at the bytes before the first blank line, and at no more than
    ``max_header_bytes`` of them.  Never raises.

    Args:
        raw: The message as received (or just its header section).
        max_header_bytes: Most bytes of ``raw`` looked at.

    Returns:
        A dict with the keys ``subject``, ``message_id``, ``from``, ``to`` and
        ``cc``, shaped as in :func:`parse_message`.
    """
    summary: dict[str, Any] = {"subject": None, "message_id": None, "from": [], "to": [], "cc": []}
    budget = _Budget()
    ignored = _Defects()
    try:
        msg = _parse_header_section(bytes(raw), max_header_bytes, budget)
        summary["subject"] = _first_unstructured(msg, "subject", budget, ignored)
        summary["message_id"] = _first_id(_first_unstructured(msg, "message-id", budget, ignored))
        for key in ("from", "to", "cc"):
            summary[key] = _addresses(msg, key, budget, ignored)
    except Exception:  # the contract is to never raise
        pass
    return summary


def _parse_header_section(raw: bytes, max_header_bytes: int, budget: _Budget) -> Message:
    """Parse only the header section of a message.

    Args:
        raw: A message.
        max_header_bytes: Most bytes of ``raw`` looked at.
        budget: The limits of this call.

    Returns:
        A message with the headers before the first blank line.
    """
    head = raw[: max(max_header_bytes, 0)]
    blank = _BLANK_LINE.search(head)
    if blank:
        head = head[: blank.end()]
    return BytesHeaderParser(_class=partial(_BoundedMessage, budget=budget), policy=_POLICY).parsebytes(head)


def _parse_into(
    result: dict[str, Any],
    defects: _Defects,
    budget: _Budget,
    raw: bytes,
    max_headers: int,
    inline_attachment_limit: int,
) -> None:
    """Parse ``raw`` and fill in ``result``; see :func:`parse_message`.

    Args:
        result: The result dict, filled in place.
        defects: Where problems are recorded.
        budget: The limits of this call.
        raw: The message.
        max_headers: See :func:`parse_message`.
        inline_attachment_limit: See :func:`parse_message`.
    """
    if not raw:
        defects.add("empty message")
        return
    msg: Message | None
    try:
        msg = BytesParser(_class=partial(_BoundedMessage, budget=budget), policy=_POLICY).parsebytes(raw)
    except _BudgetExhausted:
        msg = budget.root
    except Exception as exc:  # a stdlib parser bug: fall back to the headers
        defects.add(f"parse error: {type(exc).__name__}")
        msg = None
    if msg is None:
        _fill_headers(result, defects, budget, _parse_header_section(raw, len(raw), budget), max_headers)
        return
    _fill_headers(result, defects, budget, msg, max_headers)
    bodies = _walk(msg, defects, budget, inline_attachment_limit)
    result["text"] = "\n".join(bodies.texts) if bodies.texts else None
    result["html"] = bodies.html
    result["charsets"] = {"text": bodies.text_charset, "html": bodies.html_charset}
    result["attachments"] = bodies.attachments


def _fill_headers(result: dict[str, Any], defects: _Defects, budget: _Budget, msg: Message, max_headers: int) -> None:
    """Fill in the header-derived keys of ``result``.

    Args:
        result: The result dict, filled in place.
        defects: Where problems are recorded.
        budget: The limits of this call.
        msg: The parsed message (or just its headers).
        max_headers: Most entries in ``result["headers"]``.
    """
    defects.add_from(msg.defects)
    headers: list[dict[str, str]] = []
    for name, value in msg.raw_items():
        if len(headers) >= max_headers:
            defects.add("max_headers exceeded")
            break
        headers.append({"name": _repair(name), "value": _unstructured(name, value, budget, defects)})
    result["headers"] = headers
    result["subject"] = _first_unstructured(msg, "subject", budget, defects)
    for key, name in _ADDRESS_FIELDS:
        result[key] = _addresses(msg, name, budget, defects)
    result["date"] = _date(msg, defects)
    result["message_id"] = _first_id(_first_unstructured(msg, "message-id", budget, defects))
    result["in_reply_to"] = _first_id(_first_unstructured(msg, "in-reply-to", budget, defects))
    references = " ".join(_unstructured(name, value, budget, defects) for name, value in _raw_values(msg, "references"))
    result["references"] = _MSG_ID.findall(references) or references.split()


def _raw_values(msg: Message, name: str) -> list[tuple[str, str]]:
    """Return every raw ``(name, value)`` pair of one header.

    Args:
        msg: A parsed message.
        name: The header name, any case.

    Returns:
        The matching pairs, in order.
    """
    wanted = name.lower()
    return [(key, value) for key, value in msg.raw_items() if key.lower() == wanted]


def _unstructured(name: str, value: str, budget: _Budget, defects: _Defects) -> str:
    """Decode a raw header value as unstructured text.

    Folding is removed and RFC 2047 encoded words are decoded, within the
    decoding limits; a broken encoded word is kept as text.

    Args:
        name: The header name.
        value: The raw value.
        budget: The limits of this call.
        defects: Where problems are recorded.

    Returns:
        The decoded value.
    """
    unfolded = _unfold(value)
    if "=?" not in unfolded:  # nothing to decode: skip the slow parser
        return _repair(unfolded).rstrip(" \t")
    if len(unfolded) > _MAX_DECODED_HEADER:
        budget.note("header too long to decode")
        return _repair(unfolded).rstrip(" \t")
    if budget.decoded_chars + len(unfolded) > _MAX_DECODED_TOTAL:
        budget.note("header decode budget exceeded")
        return _repair(unfolded).rstrip(" \t")
    budget.decoded_chars += len(unfolded)
    try:
        header = _UnstructuredHeader(name, unfolded)
    except Exception as exc:  # a bug in the header parser: keep the raw text
        defects.add(f"header error: {type(exc).__name__}")
        return _repair(unfolded).rstrip(" \t")
    defects.add_from(header.defects)
    return _repair(str(header)).rstrip(" \t")


def _first_unstructured(msg: Message, name: str, budget: _Budget, defects: _Defects) -> str | None:
    """Return the first value of a header as unstructured text.

    Args:
        msg: A parsed message.
        name: The header name.
        budget: The limits of this call.
        defects: Where problems are recorded.

    Returns:
        The decoded value, or ``None`` if the header is absent.
    """
    values = _raw_values(msg, name)
    if not values:
        return None
    return _unstructured(values[0][0], values[0][1], budget, defects)


def _first_id(value: str | None) -> str | None:
    """Return the first ``<...>`` id in a header value.

    Args:
        value: A Message-ID or In-Reply-To value.

    Returns:
        The first ``<...>``, else the stripped value, else ``None``.
    """
    if value is None:
        return None
    found = _MSG_ID.search(value)
    if found:
        return found.group()
    return value.strip() or None


def _split_addresses(value: str) -> Iterator[str]:
    """Split an address list at the commas that separate its entries.

    Commas inside quoted strings, comments, angle brackets and groups do
    not split; a group stays one entry.  Linear in ``len(value)``.

    Args:
        value: An unfolded address header value.

    Yields:
        Each entry, unstripped.
    """
    start = 0
    quoted = escaped = angle = group = False
    comment = 0
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif char == "\\" and (quoted or comment):
            escaped = True
        elif quoted:
            quoted = char != '"'
        elif comment:
            comment += (char == "(") - (char == ")")
        elif char == '"':
            quoted = True
        elif char == "(":
            comment = 1
        elif char == "<":
            angle = True
        elif char == ">":
            angle = False
        elif angle:
            pass
        elif char == ":":
            group = True
        elif char == ";":
            group = False
        elif char == "," and not group:
            yield value[start:index]
            start = index + 1
    yield value[start:]


def _addresses(msg: Message, name: str, budget: _Budget, defects: _Defects) -> list[dict[str, str | None]]:
    """Return the mailboxes of every occurrence of an address header.

    Groups are flattened.  Each entry is parsed on its own, so one bad entry
    loses only itself; entries without a domain are dropped.  Work is capped
    per entry and per message (see the ``_MAX_ADDRESS*`` constants).

    Args:
        msg: A parsed message.
        name: The header name.
        budget: The limits of this call.
        defects: Where problems are recorded.

    Returns:
        ``[{"address": ..., "name": ... or None}, ...]``.
    """
    found: list[dict[str, str | None]] = []
    for key, value in _raw_values(msg, name):
        left = _MAX_ADDRESS_TOTAL - budget.address_chars
        unfolded = _unfold(value)
        if len(unfolded) > left:
            budget.note("address budget exceeded")
            unfolded = unfolded[:left]
            # the last entry is cut short: never report a truncated address
            unfolded = unfolded[: max(unfolded.rfind(","), 0)]
        budget.address_chars += len(unfolded)
        for entry in _split_addresses(unfolded):
            if not entry.strip():
                continue
            if len(entry) > _MAX_ADDRESS:
                defects.add(f"address too long in {name}")
                continue
            found.extend(_parse_address(msg, key, entry, name, defects))
    return found


# The everyday mailbox, read in one step: ``Plain Name <local@host.name>``,
# ``<local@host.name>`` or ``local@host.name``, ASCII atoms only (no quotes,
# comments, encoded words or dots in the name).  The header parser gives the
# same result for these (a property test checks it) at several times the cost.
_ATOM_WORD = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+"
_ADDR_SPEC = rf"{_ATOM_WORD}(?:\.{_ATOM_WORD})*@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*"
_SIMPLE_MAILBOX = re.compile(rf"[ \t]*(?:((?:[A-Za-z0-9]+ )*[A-Za-z0-9]+)[ \t]*<({_ADDR_SPEC})>|<({_ADDR_SPEC})>|({_ADDR_SPEC}))[ \t]*")


def simple_mailbox(entry: str) -> dict[str, str | None] | None:
    """The mailbox of an everyday address-list entry, else None (use the header parser)."""
    match = _SIMPLE_MAILBOX.fullmatch(entry)
    if match is None:
        return None
    display, named, bracketed, bare = match.groups()
    return {"address": named or bracketed or bare, "name": display or None}


def _parse_address(msg: Message, key: str, entry: str, name: str, defects: _Defects) -> list[dict[str, str | None]]:
    """Parse one address-list entry (a mailbox or a group).

    Args:
        msg: The message, for its policy.
        key: The header name as written.
        entry: One entry of the header.
        name: The header name, lower case, for defect strings.
        defects: Where problems are recorded.

    Returns:
        The entry's mailboxes that have a domain.
    """
    simple = simple_mailbox(entry)
    if simple is not None:
        return [simple]
    return _parse_address_full(msg, key, entry, name, defects)


def _parse_address_full(msg: Message, key: str, entry: str, name: str, defects: _Defects) -> list[dict[str, str | None]]:
    """:func:`_parse_address` without the shortcut: the header parser, then the legacy one."""
    found: list[dict[str, str | None]] = []
    try:
        header = msg.policy.header_fetch_parse(key, entry)
        if not isinstance(header, AddressHeader):
            raise TypeError(type(header).__name__)
        defects.add_from(getattr(header, "defects", ()))
        for group in header.groups:
            for address in group.addresses:
                if address.domain:
                    found.append({"address": _repair(address.addr_spec), "name": _repair(address.display_name) or None})
                else:
                    defects.add(f"unparseable address in {name}")
    except Exception:  # the header parser gave up: try the lenient legacy one
        defects.add(f"unparseable address in {name}")
        try:
            pairs = getaddresses([entry])
        except Exception:  # nothing more lenient to try
            pairs = []
        for display, addr_spec in pairs:
            if "@" in addr_spec.strip("@"):
                found.append({"address": _repair(addr_spec), "name": _repair(display) or None})
    return found


def _date(msg: Message, defects: _Defects) -> str | None:
    """Return the Date header as ISO 8601 UTC.

    A date without a zone (``-0000``) is taken as UTC.

    Args:
        msg: A parsed message.
        defects: Where problems are recorded.

    Returns:
        ``YYYY-MM-DDTHH:MM:SSZ``, or ``None`` if absent or unparseable.
    """
    values = _raw_values(msg, "date")
    if not values:
        return None
    key, value = values[0]
    try:
        if len(value) > _MAX_DATE:
            raise ValueError("too long")
        moment: datetime | None
        try:
            # What DateHeader does, without parsing the text it formats back
            # (a well-formed date has no defects to report).
            moment = parsedate_to_datetime(_unfold(value))
        except Exception:  # noqa: BLE001 - the header parser explains what is wrong
            header = msg.policy.header_fetch_parse(key, value)
            if not isinstance(header, DateHeader):
                raise TypeError(type(header).__name__) from None
            defects.add_from(getattr(header, "defects", ()))
            moment = header.datetime
        if moment is None:
            raise ValueError("no date")
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"
    except Exception:  # unparseable, out of range, or a header parser bug
        defects.add("unparseable date")
        return None


def _walk(msg: Message, defects: _Defects, budget: _Budget, inline_attachment_limit: int) -> _Bodies:
    """Walk the MIME tree depth first, collecting bodies and attachments.

    Args:
        msg: The parsed message.
        defects: Where problems are recorded.
        budget: The limits of this call (``max_depth`` and ``max_parts``).
        inline_attachment_limit: See :func:`parse_message`.

    Returns:
        The text bodies and attachments found.
    """
    bodies = _Bodies()
    stack: list[tuple[Message, int]] = [(msg, 0)]
    walked = 0
    while stack:
        part, depth = stack.pop()
        if getattr(part, "gomail_incomplete", False):
            continue  # the parse stopped inside this part's headers
        walked += 1
        if walked > budget.max_parts:
            budget.note("max_parts exceeded")
            break
        try:
            content_type = _repair(part.get_content_type())
            if content_type.startswith("multipart/"):
                if not part.is_multipart():
                    pass  # not split: no boundary (a defect) or too deep (noted)
                elif depth >= budget.max_depth:
                    budget.note("max_depth exceeded")
                else:
                    children = part.get_payload()
                    if isinstance(children, list):
                        stack.extend((child, depth + 1) for child in reversed(children) if isinstance(child, Message))
            else:
                _leaf(part, content_type, bodies, budget, defects, inline_attachment_limit)
        except Exception as exc:  # one bad part must not lose the others
            defects.add(f"part error: {type(exc).__name__}")
        defects.add_from(part.defects)
    return bodies


def _leaf(part: Message, content_type: str, bodies: _Bodies, budget: _Budget, defects: _Defects, inline_attachment_limit: int) -> None:
    """File one non-multipart part as a body or an attachment.

    A ``text/plain`` or ``text/html`` part is a body unless it has a
    filename or ``Content-Disposition: attachment``; only the first HTML
    part is the HTML body.  Everything else is an attachment.

    Args:
        part: The part.
        content_type: Its lower-case ``type/subtype``.
        bodies: Collected bodies and attachments, updated in place.
        budget: The limits of this call.
        defects: Where problems are recorded.
        inline_attachment_limit: See :func:`parse_message`.
    """
    disposition = _attempt(part.get_content_disposition, "content-disposition", defects)
    filename = _attempt(part.get_filename, "filename", defects)
    is_body = content_type in ("text/plain", "text/html") and disposition != "attachment" and filename is None
    if is_body and content_type == "text/html" and bodies.html is not None:
        is_body = False
    data = _payload_bytes(part, defects)
    if not is_body:
        content_id = _first_unstructured(part, "content-id", budget, defects)
        bodies.attachments.append(
            {
                "filename": filename,
                "content_type": content_type,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "content_id": (content_id.strip() or None) if content_id else None,
                "disposition": disposition,
                "content": base64.b64encode(data).decode("ascii") if 0 < len(data) <= inline_attachment_limit else None,
            }
        )
        return
    charset = _attempt(part.get_content_charset, "charset", defects)
    text = _decode_text(data, charset, defects)
    if content_type == "text/html":
        bodies.html, bodies.html_charset = text, charset
        return
    if not bodies.texts:
        bodies.text_charset = charset
    bodies.texts.append(text)


def _attempt(read: Callable[[], str | None], what: str, defects: _Defects) -> str | None:
    """Read one parameter of a part, recording failure instead of raising.

    Args:
        read: A bound ``get_filename``-like method.
        what: What it reads, for the defect string.
        defects: Where problems are recorded.

    Returns:
        The value, or ``None`` if absent, empty or unreadable.
    """
    try:
        value = read()
    except Exception:  # e.g. an RFC 2231 charset holding a NUL
        defects.add(f"unparseable {what}")
        return None
    return _repair(value) if isinstance(value, str) and value else None


def _payload_bytes(part: Message, defects: _Defects) -> bytes:
    """Return a leaf part's body with its Content-Transfer-Encoding undone.

    Bad base64 and quoted-printable are decoded as far as possible (the email
    package records the defects on the part).  The header blocks of a
    ``message/delivery-status`` part, which the stdlib always parses, are
    written out again.

    Args:
        part: A non-multipart part.
        defects: Where problems are recorded.

    Returns:
        The decoded bytes; empty if there are none.
    """
    try:
        if part.is_multipart():
            return _header_blocks(part)
        data = part.get_payload(decode=True)
    except Exception as exc:  # the body is lost, the rest is not
        if not _has_no_payload(part):
            defects.add(f"payload error: {type(exc).__name__}")
        return b""
    return data if isinstance(data, bytes) else b""


def _header_blocks(part: Message) -> bytes:
    """Write the header blocks of a ``message/delivery-status`` part back out.

    Each block's headers are written as parsed (folding kept), each block
    followed by a blank line; empty blocks are left out.  Not run through ``email.generator``, which
    cannot write the odd trees this module's parser builds for such parts.

    Args:
        part: A ``message/delivery-status`` part, parsed into blocks.

    Returns:
        The blocks as bytes with CRLF line ends.
    """
    lines: list[str] = []
    for block in part.get_payload():
        headers = list(block.raw_items()) if isinstance(block, Message) else []
        if headers:  # an empty block is just a stray blank line
            lines.extend(f"{name}: {value}\r\n" for name, value in headers)
            lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def _has_no_payload(part: Message) -> bool:
    """Tell whether a part has no body at all.

    ``get_payload(decode=True)`` raises ``UnboundLocalError`` for a part with
    no body and a base64 or quoted-printable encoding (an empty
    ``message/delivery-status``, say); that is not worth a defect.

    Args:
        part: A non-multipart part.

    Returns:
        True if the part's payload is ``None``.
    """
    try:
        return part.get_payload() is None
    except Exception:  # the payload exists but cannot even be read
        return False


def _decode_text(data: bytes, charset: str | None, defects: _Defects) -> str:
    """Decode a text body, replacing what cannot be decoded.

    A missing or ASCII charset is read as UTF-8 (a superset that 8-bit
    senders often mean); an unknown one is recorded and read as UTF-8.

    Args:
        data: The body bytes.
        charset: The declared charset, lower case, or ``None``.
        defects: Where problems are recorded.

    Returns:
        The text, without surrogates.
    """
    codec = "utf-8" if charset is None or charset in _ASCII_LABELS else charset
    try:
        text = data.decode(codec, "replace")
    except Exception:  # unknown charset, or a codec that is not a text codec
        defects.add(f"undecodable charset: {codec[:_MAX_NAME_IN_DEFECT]}")
        text = data.decode("utf-8", "replace")
    if not text.isascii() and _SURROGATE.search(text):
        text = _SURROGATE.sub("\ufffd", text)
    return text


def header_addresses(raw: bytes, names: tuple[str, ...], limit: int = 65536) -> dict[str, list[str]]:
    """Addresses in the named (lower-case) headers, cheaply.

    For the reply path (the HTTP API's envelope fallback runs on the reactor
    thread): only the header section, at most ``limit`` bytes, is read, with
    the stdlib's regex-based ``getaddresses``; about a tenth of the cost of
    :func:`parse_header_summary`.  Never raises.
    """
    end = raw.find(b"\r\n\r\n", 0, limit)
    if end < 0:
        end = raw.find(b"\n\n", 0, limit)
    head = raw[: end if end >= 0 else limit].decode("utf-8", "replace")
    values: dict[str, list[str]] = {n: [] for n in names}
    current: list[str] | None = None
    for line in head.splitlines():
        if line[:1] in (" ", "\t") and current is not None:
            current[-1] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        key = name.strip().lower()
        current = values[key] if sep and key in values else None
        if current is not None:
            current.append(value.strip())
    return {n: [a for _, a in getaddresses(v) if "@" in a] for n, v in values.items()}
