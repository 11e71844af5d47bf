"""AUTH failure counting: the keys failures count under, and the sliding-window throttle.

Split from relay/smtp/auth.py (which decides what is counted and when, and shares the counts
between workers through relay/store/authfail.py): pure, synchronous, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict, deque

from relay.config import Config
from relay.config_sections import AuthConfig
from relay.errors import Invalid
from relay.store import users


def process_share(limit: int, cfg: Config) -> int:
    """This process's share of a failure limit (auth.max_failures or the per-address one).

    With ``workers = N`` the kernel spreads an attacker's connections over N processes that count
    separately; each locks out after its share, so the service as a whole allows about
    the limit, not N times as many.
    """
    return max(1, -(-limit // cfg.workers))


def address_limit(auth: AuthConfig) -> int:
    """Failures from one client address (any login) before it is locked out for every login:
    ``auth.max_failures_per_address``, or ten times ``auth.max_failures`` when that is 0.

    Why ten: behind one NAT (an office, a carrier-grade NAT, a cloud's egress) several apps can
    fail at once, say when a reset's grace window ends and each app still has the old password;
    each stops at its own max_failures, and ten such logins can fail before the address is shut
    for the others. A client spraying logins from one address still gets at most that many
    guesses per failure window, however many logins it tries."""
    return auth.max_failures_per_address or 10 * auth.max_failures


def address_key(ip: str, ipv6_prefix: int) -> str:
    """What failures from client address ``ip`` count under: an IPv4 address itself (a /32), an
    IPv6 address's network of ``ipv6_prefix`` bits (``2001:db8:1:2::/64``).

    An IPv4-mapped IPv6 address (a dual-stack listener's view of an IPv4 client) is that IPv4
    address; a zone (``fe80::1%eth0``) is not part of the address; anything that is not an IP
    address is its own key."""
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, ipv6_prefix), strict=False))
    return str(addr)


def login_key(login: str) -> str | None:
    """The login ``login`` names (users.normalize_login), None for a malformed one."""
    try:
        return users.normalize_login(login)
    except Invalid:
        return None


class Throttle:
    """Failure counts per key in a sliding window, and the key's lockout once it reaches a limit."""

    def __init__(self, max_failures: int, window: float, lockout: float) -> None:
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._locked_until: dict[str, float] = {}

    def locked(self, key: str, now: float) -> bool:
        until = self._locked_until.get(key)
        if until is None:
            return False
        if now >= until:
            del self._locked_until[key]
            self._failures.pop(key, None)
            return False
        return True

    def fail(self, key: str, now: float) -> bool:
        """Count a failure; True if the key is now locked out."""
        q = self._failures[key]
        q.append(now)
        while q and q[0] <= now - self.window:
            q.popleft()
        if len(q) >= self.max_failures:
            self._locked_until[key] = now + self.lockout
            return True
        return False

    def record(self, key: str, now: float) -> None:
        """Count a failure here without deciding a lockout (the shared store decides)."""
        self._failures[key].append(now)

    def lock_until(self, key: str, until: float) -> None:
        """A lockout decided elsewhere (another worker, through the shared store)."""
        if until > self._locked_until.get(key, 0.0):
            self._locked_until[key] = until

    def failures(self, key: str, now: float) -> int:
        q = self._failures.get(key)
        if not q:
            return 0
        return sum(1 for t in q if t > now - self.window)

    def prune(self, now: float) -> None:
        """Forget stale keys (called periodically; bounds memory under a spray of IPs)."""
        for key in [k for k, q in self._failures.items() if not q or q[-1] <= now - self.window]:
            del self._failures[key]
        for key in [k for k, t in self._locked_until.items() if t <= now]:
            # As locked() does when a lockout ends: the failures that caused it go with it, so
            # what follows does not depend on whether a prune ran in between.
            del self._locked_until[key]
            self._failures.pop(key, None)
