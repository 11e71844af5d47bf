"""What one SMTP user may do beyond knowing its password: where from, as whom, until when, how much.

Pure rules, no I/O: parsing what an operator types (`relaybox user set`), and deciding for one
address or one moment. The store keeps each user's settings (relay/store/users.py) and its counts
(relay/store/usage.py); the SMTP side applies them (relay/smtp/auth.py at AUTH and MAIL,
relay/smtp/handler.py at MAIL, RCPT and DATA).

- **IP allow-list** (``allow_ip``): networks; empty means anywhere. An IPv4-mapped IPv6 address
  (a dual-stack listener's view of an IPv4 client) is that IPv4 address.
- **Sender allow-list** (``allow_from``): ``local@domain`` (that address; the local part compared
  exactly, the domain case-insensitively) or ``*@domain`` (any address of that domain, not of its
  subdomains). Each domain is the user's own or a subdomain of it; empty means any address of
  the user's domain (the rule without a list).
- **Expiry**: a moment (UTC); from then on the password is refused like a wrong one.
- **Sending limits**: fixed UTC windows, the clock hour and the UTC day; ``0`` is unlimited. A
  window's count starts again at its next start (the time said in the 451).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from relay import grammar
from relay.config_sections import UserLimitsConfig
from relay.errors import Invalid
from relay.units import parse_duration

LIMIT_NAMES = ("messages_per_hour", "messages_per_day", "recipients_per_day")
MAX_LIMIT = 1_000_000_000
MAX_LIST = 100  # entries in one allow-list
HOUR = 3600.0
DAY = 86400.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class LimitOverrides:
    """A user's own limits; None where the config's ``[limits.user]`` default applies."""

    messages_per_hour: int | None = None
    messages_per_day: int | None = None
    recipients_per_day: int | None = None

    def get(self, name: str) -> int | None:
        value: int | None = getattr(self, name)
        return value


@dataclass(frozen=True)
class Limits:
    """The limits that apply to a user (its overrides over the defaults); 0 is unlimited."""

    messages_per_hour: int
    messages_per_day: int
    recipients_per_day: int

    def get(self, name: str) -> int:
        value: int = getattr(self, name)
        return value

    def as_json(self, overrides: LimitOverrides) -> dict[str, dict[str, object]]:
        return {n: {"limit": self.get(n), "default": overrides.get(n) is None} for n in LIMIT_NAMES}


def effective(overrides: LimitOverrides, defaults: UserLimitsConfig) -> Limits:
    def pick(name: str) -> int:
        own = overrides.get(name)
        return int(getattr(defaults, name)) if own is None else own

    return Limits(*(pick(n) for n in LIMIT_NAMES))


def parse_limit(text: str) -> int | None:
    """A limit as typed: a count (0 = unlimited), or "default" (None: the config's)."""
    value = text.strip().lower()
    if value == "default":
        return None
    if value == "unlimited":
        return 0
    if not re.fullmatch(r"[0-9]{1,10}", value) or int(value) > MAX_LIMIT:
        raise Invalid(f"{text!r}: expected a count from 0 (unlimited) to {MAX_LIMIT}, or default")
    return int(value)


# --- windows -------------------------------------------------------------------------------------


def hour_start(now: float) -> float:
    return now - now % HOUR


def day_start(now: float) -> float:
    return now - now % DAY


def day_key(now: float) -> str:
    """The UTC day of ``now``, as the usage table keys it (2026-12-01)."""
    return _day_name(int(now // DAY))  # UTC days are DAY seconds each in POSIX time


@functools.lru_cache(maxsize=8)
def _day_name(day: int) -> str:
    # Made a few times per message (MAIL, the admission): 6 us each, a dict lookup kept.
    return datetime.datetime.fromtimestamp(day * DAY, datetime.UTC).strftime("%Y-%m-%d")


def window_end(name: str, now: float) -> float:
    """When the window of limit ``name`` that holds ``now`` ends (its count starts again)."""
    if name == "messages_per_hour":
        return hour_start(now) + HOUR
    return day_start(now) + DAY


def format_reset(at: float) -> str:
    """A window's end as a client reads it: ``14:00Z`` (it is always within a day)."""
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%H:%MZ")


def describe(name: str) -> str:
    """``messages per hour`` for ``messages_per_hour``."""
    return name.replace("_", " ")


# --- IP allow-list -------------------------------------------------------------------------------


def parse_network(text: str) -> str:
    """A CIDR (or one address) as stored: the network's canonical text (``2001:db8::/32``).
    Host bits set (``10.1.2.3/8``) are an error: the operator meant something else."""
    value = text.strip()
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise Invalid(
            f"{text!r}: expected an address or a network such as 192.0.2.0/24 ({exc})"
        ) from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        mapped = net.network_address.ipv4_mapped
        net = ipaddress.IPv4Network((mapped, max(0, net.prefixlen - 96)))
    return str(net)


def _client(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def ip_allowed(allow_ip: Sequence[str], ip: str) -> bool:
    """Whether client address ``ip`` is in the allow-list (an empty list allows every address;
    an address that does not parse is in no network)."""
    if not allow_ip:
        return True
    addr = _client(ip)
    if addr is None:
        return False
    for text in allow_ip:
        net: Network = ipaddress.ip_network(text)
        if addr.version == net.version and addr in net:
            return True
    return False


# --- sender allow-list ---------------------------------------------------------------------------


def parse_sender(text: str, user_domain: str) -> str:
    """An allow-from entry as stored: ``local@domain`` or ``*@domain`` with the domain normalised
    (IDNA, lower case), which must be ``user_domain`` or a subdomain of it."""
    value = text.strip()
    local, sep, domain = value.rpartition("@")
    if not sep or not local or not domain:
        raise Invalid(f"{text!r}: expected an address or *@domain")
    try:
        domain = grammar.normalize_domain(domain)
    except Invalid as exc:
        raise Invalid(f"{text!r}: {exc}") from None
    own = user_domain.lower()
    if domain != own and not domain.endswith("." + own):
        raise Invalid(f"{text!r}: not in the user's domain {own} or a subdomain of it")
    if local != "*" and grammar.split_address(f"{local}@{domain}") is None:
        raise Invalid(f"{text!r}: not a valid address")
    return f"{local}@{domain}"


def sender_allowed(allow_from: Sequence[str], address: str) -> bool:
    """Whether ``address`` is one the allow-list names (an empty list: no narrowing; the caller
    applies the domain rule). A malformed address is never allowed by a list."""
    if not allow_from:
        return True
    split = grammar.split_address(address)
    if split is None:
        return False
    local, domain = split
    try:
        domain = grammar.normalize_domain(domain)
    except Invalid:
        return False
    return f"{local}@{domain}" in allow_from or f"*@{domain}" in allow_from


def list_domains(allow_from: Sequence[str]) -> frozenset[str]:
    """The domains an allow-list names (a sender there passes the domain rule too)."""
    return frozenset(entry.rpartition("@")[2] for entry in allow_from)


# --- expiry --------------------------------------------------------------------------------------


def parse_expires(text: str, now: float) -> float | None:
    """``never`` (None), a duration from now (``90d``, ``12h``), or a UTC date or time
    (``2027-03-01``: its start, 00:00Z; ``2027-03-01T12:00Z``). It must be in the future."""
    value = text.strip()
    if value.lower() == "never":
        return None
    at: float
    if re.fullmatch(r"[0-9]+[smhd]", value):
        try:
            seconds = float(parse_duration(value))
        except ValueError as exc:
            raise Invalid(f"{text!r}: {exc}") from None
        if seconds <= 0:
            raise Invalid(f"{text!r}: must be in the future")
        at = now + seconds
    else:
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise Invalid(
                f"{text!r}: expected never, a duration such as 90d, or a date such as 2027-03-01"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        at = moment.timestamp()
    if at <= now:
        raise Invalid(f"{text!r}: that is in the past")
    return at


def expired(expires_at: float | None, now: float) -> bool:
    return expires_at is not None and now >= expires_at


def format_time(at: float) -> str:
    """A stored moment as the CLI shows it: ``2027-03-01T00:00:00Z``."""
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_list(entries: Sequence[str], what: str) -> tuple[str, ...]:
    """De-duplicated, order kept, at most :data:`MAX_LIST` entries."""
    out = tuple(dict.fromkeys(entries))
    if len(out) > MAX_LIST:
        raise Invalid(f"{what}: at most {MAX_LIST} entries")
    return out
