"""Mail grammar, the one copy of each: mailbox, dot-atom, path, domain name and the header block.

Pure functions over strings and bytes, no I/O: the SMTP session, the policy, the user store,
DKIM and the bounce builder all read addresses and messages through these.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

import idna

from relay.errors import Invalid

# RFC 5322 3.2.3 atext, and dot-atom (RFC 5321 4.1.2 Dot-string): atoms joined by single dots.
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
DOT_ATOM = rf"{ATEXT}(?:\.{ATEXT})*"
_DOT_ATOM = re.compile(rf"^{DOT_ATOM}$")

# RFC 5321 4.1.2 Mailbox, restricted to what we relay: dot-atom local part (or quoted string),
# and a domain of LDH labels. Lengths per RFC 5321 4.5.3.1.
_LOCAL = rf'(?:{DOT_ATOM}|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*")'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})+"
_MAILBOX = re.compile(rf"^({_LOCAL})@({_DOMAIN})$")

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_PATH = 254  # RFC 5321 4.5.3.1.3 (256 with the angle brackets)

# The common MAIL/RCPT argument: <dot-atom@LDH-domain>, then nothing, or spaces and parameters.
SIMPLE_PATH = re.compile(
    rf"^\s*<({DOT_ATOM}@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(?:[ \t]+([^\s(].*))?$",
    re.DOTALL,
)


def is_dot_atom(text: str) -> bool:
    return _DOT_ATOM.match(text) is not None


def split_address(address: str) -> tuple[str, str] | None:
    """(local, domain lowercased) of a mailbox, or None if it is not one we can relay."""
    if len(address) > MAX_PATH:
        return None
    m = _MAILBOX.match(address)
    if not m:
        return None
    local, domain = m.group(1), m.group(2)
    # The domain needs no check of its own: within 254 octets, after "@" and a local part, it
    # has at most 252 (its own limit, RFC 1035, is 253).
    if len(local) > MAX_LOCAL_PART:
        return None
    return local, domain.lower()


def mailbox_domain(address: str) -> str | None:
    """The domain of a mailbox we can relay (lowercased), or None if the address is not one."""
    parts = split_address(address)
    return parts[1] if parts else None


def domain_part(address: str) -> str:
    """What follows the last "@", lowercased; "" when there is none. For addresses already
    accepted (a queued recipient), where no syntax is checked again."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def header_block(message: bytes) -> bytes:
    """The header section: up to and including the CRLF of its last field (the blank line that
    ends it is not included); the whole message when it has no blank line."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


_LDH_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def normalize_domain(name: str) -> str:
    """The canonical form of a domain name: IDNA 2008 A-labels (UTS 46 mapping), lowercase, no
    final dot. Raises :class:`Invalid` for anything that cannot be a mail domain."""
    raw = name.strip().rstrip(".")
    if not raw:
        raise Invalid("domain name is empty")
    try:
        ascii_name = idna.encode(raw, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        raise Invalid(f"{name!r} is not a valid domain name") from None
    labels = ascii_name.split(".")
    if len(labels) < 2:
        raise Invalid(f"{name!r} is not a valid domain name: it needs at least two labels")
    if len(ascii_name) > 253 or not all(_LDH_LABEL.match(label) for label in labels):
        raise Invalid(f"{name!r} is not a valid domain name")
    if labels[-1].isdigit():
        raise Invalid(f"{name!r} is an address, not a domain name")
    return ascii_name


# --- header fields (RFC 5322 2.2, 3.6; the obsolete "Name WSP :" of 4.5 is that field) -----------

# ftext: printable US-ASCII but the colon (RFC 5322 3.6.8). A field is its name, any white space
# (obs-syntax: RFC 5322 4.5.2-4.5.6 allow WSP before the colon), the colon, and the value: the rest
# of the line and every continuation line (one starting with WSP, RFC 5322 2.2.3).
_FIELD_NAME = rb"[\x21-\x39\x3b-\x7e]+"
_FIELD_REST = rb"([ \t]*):([^\r\n]*+(?:\r\n[ \t][^\r\n]*+)*+)(?:\r\n|\Z)"
_FIELD = re.compile(rb"(" + _FIELD_NAME + rb")" + _FIELD_REST)
_FIELDS = re.compile(rb"(?:" + _FIELD.pattern + rb")*+")  # a whole header section
_OBSOLETE_NAME = re.compile(rb"^(" + _FIELD_NAME + rb")[ \t]+:", re.MULTILINE)


@dataclass(frozen=True)
class HeaderField:
    """One field of a message's header section, read the way every receiver may read it."""

    name: str  # as written, without the white space an obsolete field has before its colon
    value: bytes  # what follows the colon up to the field's last CRLF (its folds included)
    obsolete: bool  # written with white space before the colon

    @property
    def key(self) -> str:
        """The name lowercased: field names are case-insensitive (RFC 5322 1.2.2)."""
        return self.name.lower()

    def text(self) -> str:
        """The value unfolded (RFC 5322 2.2.3), as text (octets that are not UTF-8 replaced)."""
        return self.value.replace(b"\r\n", b"").decode("utf-8", "replace")


@functools.lru_cache(maxsize=32)
def _named_fields(names: tuple[str, ...]) -> re.Pattern[bytes]:
    """The fields of these names (any case), in a header section :data:`_FIELDS` matched whole:
    there, every line start is a field's or a continuation's (which starts with WSP, never a
    name). Kept by the names as given: a caller's constant costs one lookup, not a new set."""
    lowered = sorted({n.lower() for n in names})
    alternatives = b"|".join(re.escape(n.encode("ascii")) for n in lowered)
    return re.compile(rb"^(" + alternatives + rb")" + _FIELD_REST, re.MULTILINE | re.IGNORECASE)


def header_fields(message: bytes, names: Iterable[str] = ()) -> list[HeaderField] | None:
    """The fields of the header section, in order; only those named in ``names`` (any case)
    when some are given. None when a line of the section is not part of a field: no colon, a
    name with a space or an octet outside printable ASCII, or a continuation line with no field
    before it. A receiver could read such a line as a field, as the end of the header, or not at
    all: nothing checked or signed here would then be what it reads.

    The whole section is checked whatever ``names`` says, by one regex scan; only the fields
    asked for become objects, so a header of many fields costs no memory."""
    if message.startswith(b"\r\n"):  # an empty header section: the body follows the blank line
        return []
    block = header_block(message)
    if _FIELDS.fullmatch(block) is None:
        return None
    wanted = tuple(names)
    found = _named_fields(wanted).finditer(block) if wanted else _FIELD.finditer(block)
    return [HeaderField(m[1].decode("ascii"), m[3], bool(m[2])) for m in found]


def _modern(m: re.Match[bytes]) -> bytes:
    return m[1] + b":"


def has_obsolete_field_names(message: bytes) -> bool:
    """Whether a field is written "Name WSP :" (what :func:`modern_field_names` rewrites), found
    without building the rewritten message."""
    if message.startswith(b"\r\n"):
        return False
    return _OBSOLETE_NAME.search(header_block(message)) is not None


def modern_field_names(message: bytes) -> bytes:
    """The message with every field written "Name WSP :" written "Name:" (same field, same
    meaning: RFC 5322 4.5; what DKIM's relaxed canonicalisation does too, RFC 6376 3.4.2), so
    that every reader, dkimpy included, reads the fields this module reads. The message itself
    when no field needs it. For a message whose :func:`header_fields` is not None."""
    if message.startswith(b"\r\n"):
        return message
    block = header_block(message)
    modern = _OBSOLETE_NAME.sub(_modern, block)
    return message if modern == block else modern + message[len(block) :]
