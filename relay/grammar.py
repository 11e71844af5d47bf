"""Mail grammar, the one copy of each: mailbox, dot-atom, path, domain name and the header block.

Pure functions over strings and bytes, no I/O: the SMTP session, the policy, the user store,
DKIM and the bounce builder all read addresses and messages through these.
"""

from __future__ import annotations

import re

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
