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
  password (HMAC with a per-process random key; never the password). A hit still looks at the
  stored credentials so a reset, disable or delete takes effect on the next AUTH.
- Stored credentials (AUTH's cache hits, the recheck at MAIL FROM): kept by a
  relay/store/readcache.py cache, read again after any write to the main store (so as soon as a
  CLI command that changed them has returned), at once on PostgreSQL.
- Single flight: simultaneous logins with the same credentials share one argon2 verify.
- Every failure takes at least ``auth.failure_delay``, so timing says nothing about why.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import secrets
from dataclasses import dataclass, field
from enum import Enum

from relay import clock as clock_mod
from relay import maillog
from relay.clock import Clock
from relay.config import Config
from relay.smtp.controls import Controls, refusal
from relay.smtp.throttle import Throttle, address_key, address_limit, login_key, process_share
from relay.store import authfail, events, logins
from relay.store.db import StoreError
from relay.store.engine import Store
from relay.store.passwords import Hasher
from relay.store.readcache import ReadCache


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


class Authenticator:
    def __init__(
        self,
        db: Store,
        hasher: Hasher,
        cfg: Config,
        *,
        clock: Clock = clock_mod.system,
        shared: Store | None = None,
    ) -> None:
        """``shared``: where failures and lockouts are counted for every worker (usage.db,
        relay/store/authfail.py): the limits are then the service's, exactly. Without it each
        process counts alone and locks out after its share of each limit."""
        self.db = db
        self.hasher = hasher
        self.cfg = cfg
        self.clock = clock
        self.shared = shared
        a = cfg.auth
        # Per client address (any login), per (address, login), and per login (audit only).
        self.throttle = Throttle(self._limit(address_limit(a)), a.failure_window, a.lockout)
        self.pairs = Throttle(self._limit(a.max_failures), a.failure_window, a.lockout)
        self.login_failures = Throttle(self._limit(a.max_failures), a.failure_window, a.lockout)
        self._names = {id(self.throttle): "addr", id(self.pairs): "pair"}
        self._names[id(self.login_failures)] = "login"
        self._cache: dict[tuple[str, bytes], _CacheEntry] = {}
        self._inflight: dict[tuple[str, bytes], asyncio.Future[logins.VerifyResult]] = {}
        self._key = secrets.token_bytes(32)
        self.logins: dict[str, float] = {}  # last successful login per user, flushed in batches
        self.credentials: ReadCache[str, logins.Credentials | None] = ReadCache(db.generation)
        self._lockout_gen = authfail.generation(cfg) if shared is not None else None
        self.lockouts: ReadCache[tuple[str, ...], tuple[tuple[str, float], ...]] = ReadCache(
            self._lockout_gen
        )

    def configure(self, cfg: Config) -> None:
        """Apply a reloaded config (limits and TTLs; counts are kept)."""
        self.cfg = cfg
        limits = (address_limit(cfg.auth), cfg.auth.max_failures, cfg.auth.max_failures)
        for t, limit in zip((self.throttle, self.pairs, self.login_failures), limits, strict=True):
            t.max_failures = self._limit(limit)
            t.window = cfg.auth.failure_window
            t.lockout = cfg.auth.lockout
        if float(cfg.auth.cache_ttl) <= 0:
            self._cache.clear()

    def _limit(self, limit: int) -> int:
        return limit if self.shared is not None else process_share(limit, self.cfg)

    def _shared_key(self, t: Throttle, key: str) -> str:
        return f"{self._names[id(t)]}:{key}"

    async def _pull(self, keys: list[tuple[Throttle, str]], now: float) -> None:
        """Lockouts another worker decided for these keys, into this process's throttles."""
        shared = self.shared
        if shared is None:
            return
        names = tuple(self._shared_key(t, k) for t, k in keys)

        async def read() -> tuple[tuple[str, float], ...]:
            return tuple((await authfail.lockouts(shared, names, now)).items())

        try:  # kept until a worker writes a lockout: a lockout that ended just stops holding
            found = dict(await self.lockouts.get(names, read))
        except StoreError:
            return  # this process's own lockouts still hold
        for t, k in keys:
            until = found.get(self._shared_key(t, k))
            if until is not None:
                t.lock_until(k, until)

    async def _fail(self, t: Throttle, key: str, now: float) -> bool:
        """Count a failure for ``key`` (for every worker when shared); True if it locked out."""
        if self.shared is None:
            return t.fail(key, now)
        try:
            until = await authfail.fail(
                self.shared,
                self._shared_key(t, key),
                now,
                window=t.window,
                limit=t.max_failures,
                lockout=t.lockout,
            )
        except BaseException as exc:
            self._lockout_written()  # maybe it was (a failed COMMIT, a cancellation)
            if isinstance(exc, StoreError):
                return t.fail(key, now)  # the shared store failed: this process counts alone
            raise
        if until is not None:
            self._lockout_written()
        t.record(key, now)
        if until is None:
            return False
        t.lock_until(key, until)
        return True

    def _lockout_written(self) -> None:
        """Every worker's kept lockouts (:meth:`_pull`) are read again at its next AUTH."""
        if self._lockout_gen is not None:
            self._lockout_gen.advance()

    async def prune_shared(self) -> None:
        """Forget the shared failures and lockouts that ended (the server's periodic task)."""
        if self.shared is not None:
            await authfail.prune(self.shared, self.clock(), self.cfg.auth.failure_window)

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
        normal = login_key(login)
        where = self._address(ip)
        pair = f"{where} {normal or ''}"  # a login has no space; malformed ones share ""
        key = normal or login.lower()[:320]
        await self._pull(
            [(self.throttle, where), (self.pairs, pair), (self.login_failures, key)], now
        )
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
        already = self.login_failures.locked(key, now)
        if await self._fail(self.login_failures, key, now) and not already:
            # Many failures for one login, maybe from many addresses: nothing is blocked (that
            # would let anyone lock a user out), but operators are told once per window.
            maillog.event("auth login-failures", user=key, ip=ip, limit=self.cfg.auth.max_failures)
            await self._audit("auth.login-failures", maillog.safe(key, 320), f"last ip={ip}")
        seconds = int(self.cfg.auth.lockout)
        reason = answer.reason
        if await self._fail(self.pairs, pair, now):
            reason += ",ip_login_now_locked_out"
            maillog.event(
                "auth lockout", ip=ip, user=key, seconds=seconds, scope="login", key=where
            )
            await self._audit("auth.lockout", where, f"user={maillog.safe(key)}")
        if await self._fail(self.throttle, where, now):
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
        creds = await self.credentials.get(login, lambda: logins.credentials(self.db, login))
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
        """Re-check an authenticated session (at MAIL FROM): the user's controls as stored now
        (read, or kept from a read since which nothing was written), or None and why not
        (``credentials_revoked``: deleted, disabled or its password reset since AUTH;
        ``expired``; ``ip_not_allowed``). Revocation is immediate."""
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
