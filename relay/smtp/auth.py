"""SMTP authentication: throttle -> cache -> logins.verify (argon2 in a thread pool).

The SMTP session talks to :class:`Authenticator` only, never to the user store (chasquid's shape).

- Throttle: failures are counted within ``auth.failure_window`` per (client address, login), per
  client address, and per login. A login with ``auth.max_failures`` failures from one address is
  locked out there for ``auth.lockout``; an address with ``auth.max_failures_per_address``
  failures (ten times as many by default) is locked out for every login. A locked out AUTH gets
  454 4.7.0 without any argon2 work. So one client behind a NAT, failing with its login, locks
  out that login there, not everyone else behind the NAT; a client spraying logins from one
  address still meets a bound. Per login alone nothing is locked (that would let anyone lock any
  user out): operators are told (``auth.login-failures``).
- Keys: a login counts under :func:`users.normalize_login` (its aliases, ``APP@example.com.``,
  full-width letters, surrounding spaces, are one login), a malformed one under one shared name
  per address (it can never log in, so locking it out harms nobody). An address counts under
  :func:`address_key`: an IPv4 address as it is, an IPv6 address by its ``auth.ipv6_prefix``
  network (a /64 by default: one subnet, which a client that has one rotates through at will).
- Cache: a successful verify is remembered for ``auth.cache_ttl`` under a keyed digest of the
  password (HMAC with a per-process random key; never the password). A hit still reads the stored
  credentials (one cheap SQL read) so a reset, disable or delete takes effect on the next AUTH.
- Single flight: simultaneous logins with the same credentials share one argon2 verify.
- Every failure takes at least ``auth.failure_delay``, so timing says nothing about why.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import random
import secrets
from collections import defaultdict, deque
from dataclasses import dataclass, field
from enum import Enum

from relay import clock as clock_mod
from relay import maillog
from relay.clock import Clock
from relay.config import Config
from relay.config_sections import AuthConfig
from relay.errors import Invalid
from relay.smtp.controls import Controls, refusal
from relay.store import events, logins, users
from relay.store.db import Database, StoreError
from relay.store.passwords import Hasher


class Outcome(Enum):
    OK = "ok"
    FAILED = "failed"
    THROTTLED = "throttled"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class Identity:
    """Who a session authenticated as, and with which stored hash (to re-check revocation)."""

    login: str
    domain: str
    which: str  # "current" | "previous"
    password_hash: str = field(repr=False)


@dataclass(frozen=True)
class AuthAnswer:
    outcome: Outcome
    identity: Identity | None = None
    reason: str = ""


@dataclass
class _CacheEntry:
    login: str  # as stored (normalized), whatever case the client typed
    password_hash: str
    domain: str
    expires_at: float


def _share(limit: int, cfg: Config) -> int:
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


def _login_key(login: str) -> str | None:
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


class Authenticator:
    def __init__(
        self, db: Database, hasher: Hasher, cfg: Config, *, clock: Clock = clock_mod.system
    ) -> None:
        self.db = db
        self.hasher = hasher
        self.cfg = cfg
        self.clock = clock
        a = cfg.auth
        # Per client address (any login), per (address, login), and per login (audit only).
        self.throttle = Throttle(_share(address_limit(a), cfg), a.failure_window, a.lockout)
        self.pairs = Throttle(_share(a.max_failures, cfg), a.failure_window, a.lockout)
        self.login_failures = Throttle(_share(a.max_failures, cfg), a.failure_window, a.lockout)
        self._cache: dict[tuple[str, bytes], _CacheEntry] = {}
        self._inflight: dict[tuple[str, bytes], asyncio.Future[logins.VerifyResult]] = {}
        self._key = secrets.token_bytes(32)
        self.logins: dict[str, float] = {}  # last successful login per user, flushed in batches

    def configure(self, cfg: Config) -> None:
        """Apply a reloaded config (limits and TTLs; counts are kept)."""
        self.cfg = cfg
        limits = (address_limit(cfg.auth), cfg.auth.max_failures, cfg.auth.max_failures)
        for t, limit in zip((self.throttle, self.pairs, self.login_failures), limits, strict=True):
            t.max_failures = _share(limit, cfg)
            t.window = cfg.auth.failure_window
            t.lockout = cfg.auth.lockout
        if float(cfg.auth.cache_ttl) <= 0:
            self._cache.clear()

    def is_throttled(self, ip: str) -> bool:
        """True while client address ``ip`` is locked out for every login (before any SASL)."""
        return self.throttle.locked(self._address(ip), self.clock())

    def _address(self, ip: str) -> str:
        return address_key(ip, self.cfg.auth.ipv6_prefix)

    def _digest(self, login: str, password: str) -> tuple[str, bytes]:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        mac.update(login.encode("utf-8", "surrogateescape"))
        mac.update(b"\0")
        mac.update(password.encode("utf-8", "surrogateescape"))
        return (login, mac.digest())

    async def authenticate(self, login: str, password: str, ip: str) -> AuthAnswer:
        started = asyncio.get_running_loop().time()
        now = self.clock()
        # Normalized once, before anything counts: every alias of a login is that login.
        normal = _login_key(login)
        where = self._address(ip)
        pair = f"{where} {normal or ''}"  # a login has no space; malformed ones share ""
        if self.throttle.locked(where, now):
            return AuthAnswer(Outcome.THROTTLED, reason="ip_locked_out")
        if self.pairs.locked(pair, now):
            return AuthAnswer(Outcome.THROTTLED, reason="ip_login_locked_out")
        try:
            answer, controls = await self._check(normal or login, password)
        except StoreError:
            return AuthAnswer(Outcome.TEMPFAIL, reason="store_error")
        if answer.outcome is Outcome.OK:
            assert answer.identity is not None and controls is not None
            # The right password, but not from here or no longer: the same 535 as a wrong one
            # (nothing revealed), counted like one; the log says why.
            refused = refusal(controls, ip, now)
            if refused is None:
                self.logins[answer.identity.login] = self.clock()
                return answer
            answer = AuthAnswer(Outcome.FAILED, reason=refused)
        key = normal or login.lower()[:320]
        already = self.login_failures.locked(key, now)
        if self.login_failures.fail(key, now) and not already:
            # Many failures for one login, maybe from many addresses: nothing is blocked (that
            # would let anyone lock a user out), but operators are told once per window.
            maillog.event("auth login-failures", user=key, ip=ip, limit=self.cfg.auth.max_failures)
            await self._audit("auth.login-failures", maillog.safe(key, 320), f"last ip={ip}")
        seconds = int(self.cfg.auth.lockout)
        reason = answer.reason
        if self.pairs.fail(pair, now):
            reason += ",ip_login_now_locked_out"
            maillog.event(
                "auth lockout", ip=ip, user=key, seconds=seconds, scope="login", key=where
            )
            await self._audit("auth.lockout", where, f"user={maillog.safe(key)}")
        if self.throttle.fail(where, now):
            reason += ",ip_now_locked_out"
            maillog.event(
                "auth lockout", ip=ip, user=key, seconds=seconds, scope="address", key=where
            )
            await self._audit("auth.lockout", where, f"all users; last user={maillog.safe(key)}")
        await self._pad(started)
        return AuthAnswer(Outcome.FAILED, reason=reason)

    async def _audit(self, action: str, target: str, detail: str) -> None:
        try:
            await events.record(
                self.db,
                now=self.clock(),
                actor="relaybox",
                action=action,
                target=target,
                detail=detail,
            )
        except StoreError:
            pass  # the mail log has it; an audit row is not worth failing an AUTH for

    async def _pad(self, started: float) -> None:
        """Make every failure take at least failure_delay (plus jitter), whatever its cause."""
        delay = self.cfg.auth.failure_delay
        if delay <= 0:
            return
        elapsed = asyncio.get_running_loop().time() - started
        remaining = delay - elapsed + random.uniform(0, delay / 5)
        if remaining > 0:
            await asyncio.sleep(remaining)

    async def _check(self, login: str, password: str) -> tuple[AuthAnswer, Controls | None]:
        """Whether the password matches, and (when it does) the user's controls as stored."""
        key = self._digest(login, password)
        now = self.clock()
        entry = self._cache.get(key)
        if entry is not None:
            if now >= entry.expires_at:
                del self._cache[key]
            else:
                found = await self._still_matches(login, entry.password_hash, now)
                if found is not None:
                    which, creds = found
                    identity = Identity(entry.login, entry.domain, which, entry.password_hash)
                    return AuthAnswer(Outcome.OK, identity), Controls.of(creds)
                del self._cache[key]
        result = await self._verify_single_flight(key, login, password)
        if result.matched is None or result.user is None or result.password_hash is None:
            return AuthAnswer(Outcome.FAILED, reason="bad_credentials"), None
        user = result.user
        if self.cfg.auth.cache_ttl > 0:
            self._cache[key] = _CacheEntry(
                user.login, result.password_hash, user.domain, now + self.cfg.auth.cache_ttl
            )
        identity = Identity(user.login, user.domain, result.matched, result.password_hash)
        controls = Controls(user.limits, user.allow_ip, user.allow_from, user.expires_at)
        return AuthAnswer(Outcome.OK, identity), controls

    async def _verify_single_flight(
        self, key: tuple[str, bytes], login: str, password: str
    ) -> logins.VerifyResult:
        """One verify for every simultaneous AUTH with the same credentials.

        The verify runs as a task of its own, not in the first caller: a caller that goes away
        (its client disconnected, so aiosmtpd cancelled its handler) must not cancel the verify
        that the other callers are waiting for.
        """
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(
                logins.verify(self.db, login, password, hasher=self.hasher, now=self.clock())
            )
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._verify_done(key, t))
        return await asyncio.shield(task)

    def _verify_done(
        self, key: tuple[str, bytes], task: asyncio.Future[logins.VerifyResult]
    ) -> None:
        # Its error needs no retrieving here: each caller's shield retrieves it, also when that
        # caller was cancelled (tests/test_auth.py checks nothing logs "never retrieved").
        if self._inflight.get(key) is task:
            del self._inflight[key]

    async def _still_matches(
        self, login: str, password_hash: str, now: float
    ) -> tuple[str, logins.Credentials] | None:
        """Which stored password ``password_hash`` still is ("current"/"previous") and the
        stored row, or None."""
        creds = await logins.credentials(self.db, login)
        if creds is None or creds.disabled:
            return None
        if hmac.compare_digest(creds.current_hash, password_hash):
            return "current", creds
        if (
            creds.previous_hash is not None
            and creds.previous_valid_until is not None
            and now < creds.previous_valid_until
            and hmac.compare_digest(creds.previous_hash, password_hash)
        ):
            return "previous", creds
        return None

    async def recheck(self, identity: Identity, ip: str) -> tuple[Controls | None, str]:
        """Re-check an authenticated session (at MAIL FROM), one read: the user's controls as
        stored now, or None and why not (``credentials_revoked``: deleted, disabled or its
        password reset since AUTH; ``expired``; ``ip_not_allowed``). Revocation is immediate."""
        now = self.clock()
        found = await self._still_matches(identity.login, identity.password_hash, now)
        if found is None:
            return None, "credentials_revoked"
        controls = Controls.of(found[1])
        refused = refusal(controls, ip, now)
        if refused is not None:
            return None, refused
        return controls, ""

    async def still_valid(self, identity: Identity, ip: str = "") -> bool:
        """Whether an authenticated session's credential still holds (:meth:`recheck`)."""
        controls, _why = await self.recheck(identity, ip)
        return controls is not None

    async def flush_logins(self) -> None:
        """Write the batched last-login times (one transaction for all)."""
        if not self.logins:
            return
        batch, self.logins = self.logins, {}
        try:
            await logins.record_logins(self.db, batch)
        except StoreError:
            for k, v in batch.items():
                self.logins.setdefault(k, v)

    def prune(self) -> None:
        now = self.clock()
        self.throttle.prune(now)
        self.pairs.prune(now)
        self.login_failures.prune(now)
        for key in [k for k, e in self._cache.items() if e.expires_at <= now]:
            del self._cache[key]
