"""A user's controls in a session: the allow-lists and expiry (at AUTH and MAIL FROM) and the
sending limits (at MAIL FROM, RCPT TO and the end of DATA).

The rules are relay/userrules.py; the counts relay/store/usage.py, and relay/store/admissions.py
makes a limit exact for the whole service. :class:`Quota` says the refusals: the 451 with the time
the window ends, the mail-log line (``limited user=... limit=...``, once per window for the whole
service), the metric by limit, and the count of refusals in the usage.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay import maillog, replies, userrules
from relay.clock import Clock
from relay.config import Config
from relay.metrics import Metrics
from relay.replies import Reply
from relay.smtp.policy import Senders
from relay.store import admissions, logins, usage
from relay.store.db import StoreError
from relay.store.engine import Store
from relay.store.usage import Counts, Hit
from relay.userrules import LimitOverrides, Limits


@dataclass(frozen=True)
class Controls:
    """What a user may do beyond its password, as stored when it was last read (AUTH, MAIL)."""

    limits: LimitOverrides = LimitOverrides()
    allow_ip: tuple[str, ...] = ()
    allow_from: tuple[str, ...] = ()
    expires_at: float | None = None

    @classmethod
    def of(cls, creds: logins.Credentials) -> Controls:
        return cls(creds.limits, creds.allow_ip, creds.allow_from, creds.expires_at)


def refusal(controls: Controls, ip: str, now: float) -> str | None:
    """Why a right password is refused anyway (the log's reason), or None."""
    if userrules.expired(controls.expires_at, now):
        return "expired"
    if not userrules.ip_allowed(controls.allow_ip, ip):
        return "ip_not_allowed"
    return None


@dataclass(frozen=True)
class Grant:
    """What MAIL FROM read for one transaction: who the user may send as, its limits, and its
    counts then (RCPT's early answer; DATA's admission is the exact one)."""

    senders: Senders
    limits: Limits
    counts: Counts


def limit_reply(login: str, hit: Hit) -> Reply:
    return replies.LIMIT_REACHED.fill(
        login=login,
        limit=str(hit.limit),
        what=userrules.describe(hit.name),
        at=userrules.format_reset(hit.resets_at),
    )


class Quota:
    """The sending limits of every session of one process, counted in the shared store."""

    def __init__(self, db: Store, cfg: Config, metrics: Metrics, clock: Clock) -> None:
        """``db``: the main database through its counting handle (synchronous NORMAL)."""
        self.db = db
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        self.admissions = admissions.Admissions(db)

    async def close(self) -> None:
        await self.admissions.close()

    def configure(self, cfg: Config) -> None:
        self.cfg = cfg

    def limits(self, controls: Controls) -> Limits:
        return userrules.effective(controls.limits, self.cfg.limits.user)

    async def at_mail(self, login: str, limits: Limits) -> tuple[Reply | None, Counts]:
        """MAIL FROM: a 451 if one more message would pass a limit; the counts for RCPT. The
        early answer: from what this process's last admission saw within a second, else one
        read (another worker's messages of that second may be missing; DATA's is exact)."""
        if not any(limits.get(n) for n in userrules.LIMIT_NAMES):
            return None, Counts()
        now = self.clock()
        counts = self.admissions.recent(login, now) or await usage.snapshot(self.db, login, now)
        hit = usage.first_hit(limits, counts, now)
        if hit is None:
            return None, counts
        return await self.refused(login, hit, now), counts

    def rcpt_hit(self, limits: Limits, counts: Counts, so_far: int) -> Hit | None:
        """RCPT TO: whether one more recipient (``so_far`` already in this message) would pass
        recipients_per_day, as of the counts read at MAIL FROM."""
        limit = limits.recipients_per_day
        if limit and counts.recipients_today + so_far + 1 > limit:
            now = self.clock()
            return Hit("recipients_per_day", limit, userrules.window_end("recipients_per_day", now))
        return None

    async def admit(
        self, login: str, recipients: int, limits: Limits
    ) -> tuple[Reply | None, float]:
        """End of DATA, before queueing: count the message, or the 451 of the limit it would
        pass (then nothing is counted). Returns the time counted at (for :meth:`release`)."""
        now = self.clock()
        hit = await self.admissions.admit(login, recipients, limits, now)
        if hit is None:
            return None, now
        return await self.refused(login, hit, now), now

    async def release(self, login: str, recipients: int, admitted_at: float) -> None:
        """The message admitted at ``admitted_at`` was not queued: it does not count."""
        self.admissions.forget(login)
        try:
            await usage.release(self.db, login, recipients, admitted_at)
        except StoreError as exc:  # counted once too often: errs on the safe side
            maillog.event("usage release failed", user=login, error=type(exc).__name__)

    async def refused(self, login: str, hit: Hit, now: float | None = None) -> Reply:
        """Count a refusal at ``hit``; its first in the window is logged. The 451 to say."""
        at = self.clock() if now is None else now
        self.metrics.limited(hit.name)
        try:
            first = await usage.note_refused(self.db, login, hit, at)
        except StoreError:
            first = False  # the refusal stands; the count and the line are lost
        if first:
            maillog.event(
                "limited",
                user=login,
                limit=hit.name,
                value=hit.limit,
                until=userrules.format_time(hit.resets_at),
            )
        return limit_reply(login, hit)
