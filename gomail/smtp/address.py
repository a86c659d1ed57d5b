"""RFC 5321 paths: the arguments of ``MAIL FROM:`` and ``RCPT TO:``.

The grammar is RFC 5321 section 4.1.2, extended for internationalised
addresses by RFC 6531 section 3.3.  Source routes (``<@a,@b:user@d>``) are
parsed and ignored, as RFC 5321 section 4.1.1.3 asks.  Two leniencies that
real clients need are allowed: a space after the colon (``MAIL FROM: <a@b>``)
and a bare address without angle brackets when it has no spaces.
"""

from __future__ import annotations

import ipaddress
import re

import idna

from gomail.errors import InvalidSyntax

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_UTF8 = "\u00a0-\U0010ffff"
_DOT_STRING = re.compile(rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*")
_QUOTED_STRING = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"')
_SUB_DOMAIN = re.compile(rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9\-{_UTF8}]*[A-Za-z0-9{_UTF8}])?")
_KEYWORD = re.compile(r"(FROM|TO):[ \t]*", re.IGNORECASE)
_ROUTE = re.compile(r"@[^,:@<>\s]+(?:,@[^,:@<>\s]+)*")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9\-]*)(?:=([^\x00-\x20=\x7f]+))?")
# The everyday case, checked in one step: ``FROM:<local@host.name>`` or
# ``TO:<...>`` with an ASCII dot-atom local part, a host name, and nothing
# after.  What it matches, the full parser accepts unchanged (a property
# test checks that); anything else goes through the full parser.
_LDH = r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
_SIMPLE = re.compile(rf"(?i:FROM|TO):<((?:[{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@({_LDH}(?:\.{_LDH})*))>")


class AddressError(InvalidSyntax):
    """A bad path or parameter, with the SMTP reply codes it deserves.

    Attributes:
        code: The basic SMTP reply code (501, 553...).
        enhanced: The enhanced status code (``5.1.7``, ``5.1.3``...).
    """

    def __init__(self, message: str, code: int = 501, enhanced: str = "5.5.4") -> None:
        super().__init__(message)
        self.code = code
        self.enhanced = enhanced

    def smtp_reply(self) -> tuple[int, str]:
        """The basic and enhanced status codes of this error."""
        return self.code, self.enhanced


def parse_path_argument(arg: str, *, smtputf8_allowed: bool) -> tuple[str, dict[str, str | None]]:
    """Parse ``FROM:<path> params`` or ``TO:<path> params``.

    Args:
        arg: The command argument after ``MAIL `` or ``RCPT ``, starting with
            the ``FROM:``/``TO:`` keyword (any case).
        smtputf8_allowed: Whether non-ASCII addresses are allowed: for RCPT,
            whether the transaction's MAIL had ``SMTPUTF8``; for MAIL, whether
            the server offers it (the ``SMTPUTF8`` parameter on the same
            command is then required too).

    Returns:
        The address (``""`` for the null sender ``<>``, source route removed,
        needlessly quoted local parts unquoted) and the ESMTP parameters,
        keywords upper-cased, ``None`` for a parameter without a value.

    Raises:
        AddressError: ``501 5.5.4`` for a missing keyword or bad parameters,
            ``501 5.1.7``/``501 5.1.3`` for a bad sender/recipient path,
            ``553 5.1.7``/``553 5.1.3`` for over-long local parts or domains,
            ``553 5.6.7`` for a non-ASCII address without SMTPUTF8.
    """
    simple = simple_path(arg)
    if simple is not None:
        return simple, {}
    return _parse_path(arg, smtputf8_allowed)


def simple_path(arg: str) -> str | None:
    """The address of an everyday ``FROM:<a@b.c>``/``TO:<a@b.c>`` argument, else None.

    A shortcut of :func:`parse_path_argument` (several times cheaper):
    for every argument it answers, the full parser gives the same address
    and no parameters.
    """
    simple = _SIMPLE.fullmatch(arg)
    if simple is None:
        return None
    address, domain = simple.group(1), simple.group(2)
    if len(address) - len(domain) - 1 > MAX_LOCAL_PART or len(address) + 2 > MAX_PATH:
        return None
    if any(len(label) > 63 for label in domain.split(".")):
        return None
    return address


def _parse_path(arg: str, smtputf8_allowed: bool) -> tuple[str, dict[str, str | None]]:
    """:func:`parse_path_argument` without the shortcut."""
    match = _KEYWORD.match(arg)
    if match is None:
        raise AddressError("Syntax: MAIL FROM:<address> or RCPT TO:<address>")
    sender = match.group(1).upper() == "FROM"
    enhanced = "5.1.7" if sender else "5.1.3"
    bad = AddressError(f"Bad {'sender' if sender else 'recipient'} address syntax", 501, enhanced)
    rest = arg[match.end() :]
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if end < 0:
            raise bad
        inner, tail = rest[1:end], rest[end + 1 :]
        if tail and tail[0] not in " \t":
            raise bad
    else:
        inner = rest.split(None, 1)[0] if rest.strip() else ""
        tail = rest[len(inner) :]
        if not inner or any(c in inner for c in '<>"'):
            raise bad
    params = _parse_params(tail)
    if not inner.isascii():
        if not smtputf8_allowed or (sender and "SMTPUTF8" not in params):
            raise AddressError("Error: non-ASCII address requires SMTPUTF8", 553, "5.6.7")
    if inner == "":
        if sender:
            return "", params
        raise bad
    path_length = len(inner.encode("utf-8")) + 2
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0 or _ROUTE.fullmatch(inner[:colon]) is None:
            raise bad
        inner = inner[colon + 1 :]
    address = _parse_mailbox(inner, sender, bad)
    if path_length > MAX_PATH:
        raise AddressError("Error: path too long", 501, enhanced)
    return address, params


def domain_of(address: str) -> str:
    """The domain of an address, lower-cased, as ASCII (A-labels).

    Args:
        address: An address as returned by :func:`parse_path_argument`.

    Returns:
        The domain after the last ``@``; ``""`` for the null sender or a
        domain-less ``postmaster``. Internationalised domains are converted
        to their ``xn--`` form; address literals are returned as written.
    """
    at = address.rfind("@")
    if at < 0:
        return ""
    domain = address[at + 1 :]
    if domain.isascii() or domain.startswith("["):
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except idna.IDNAError:
        return domain.lower()


def _closing_bracket(text: str) -> int:
    """The index of the ``>`` closing the path that ``text`` starts with, or -1."""
    if '"' not in text:
        end = text.find(">")
        return end if end > 0 and "<" not in text[1:end] else -1
    quoted = False
    i = 1
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            return i
        elif c == "<":
            return -1
        i += 1
    return -1


def _parse_params(tail: str) -> dict[str, str | None]:
    """Parse the space-separated ``KEY[=VALUE]`` parameters after a path."""
    params: dict[str, str | None] = {}
    for word in tail.split():
        match = _PARAM.fullmatch(word)
        if match is None:
            raise AddressError(f"Error: bad parameter syntax: {safe_text(word)}")
        key = match.group(1).upper()
        if key in params:
            raise AddressError(f"Error: duplicate parameter: {key}")
        params[key] = match.group(2)
    return params


def _parse_mailbox(mailbox: str, sender: bool, bad: AddressError) -> str:
    """Check ``local@domain`` and return it in canonical form."""
    enhanced = "5.1.7" if sender else "5.1.3"
    if mailbox.startswith('"'):
        match = _QUOTED_STRING.match(mailbox)
        if match is None or mailbox[match.end() : match.end() + 1] != "@":
            raise bad
        local, domain = match.group(0), mailbox[match.end() + 1 :]
        unquoted = re.sub(r"\\(.)", r"\1", local[1:-1])
        if _DOT_STRING.fullmatch(unquoted):
            local = unquoted
    else:
        at = mailbox.rfind("@")
        if at < 0:
            if not sender and mailbox.lower() == "postmaster":
                return mailbox
            raise bad
        local, domain = mailbox[:at], mailbox[at + 1 :]
        if _DOT_STRING.fullmatch(local) is None:
            raise bad
    if not _valid_domain(domain):
        raise bad
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("Error: local part too long", 553, enhanced)
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("Error: domain too long", 553, enhanced)
    return f"{local}@{domain}"


def _valid_domain(domain: str) -> bool:
    """Whether ``domain`` is a host name (LDH or U-labels) or an address literal."""
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            if literal[:5].upper() == "IPV6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            return False
        return True
    labels = domain.split(".")
    if not all(_SUB_DOMAIN.fullmatch(label) for label in labels):
        return False
    if domain.isascii():
        return all(len(label) <= 63 for label in labels)
    try:
        idna.encode(domain, uts46=True)
    except idna.IDNAError:
        return False
    return True


def safe_text(text: str, limit: int = 64) -> str:
    """Text safe to echo in an SMTP reply: control characters replaced, length capped.

    Args:
        text: Any text, possibly from the client.
        limit: The most characters to keep.

    Returns:
        ``text`` with non-printable characters replaced by ``?``, cut at
        ``limit`` characters (then ``...`` is appended).
    """
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")
