"""Per-user sending counts: the sending limits' windows, and the usage history.

Tables of ``usage.db`` in the state dir, which every worker sees (so a limit holds for the service
as a whole, not per process). A file of its own, not the main database: a CLI holding the main
database's write lock (a slow `user add`) must not hold up mail, and every accepted message
writes here.

- ``usage_days`` (login, UTC day): messages accepted, their recipients, recipients delivered,
  deferred and bounced, and messages refused at a limit; what `relaybox user usage` shows. Each
  count is of the day it happened (a delivery the day after its acceptance counts the day after).
  The row also holds the current clock hour and the messages accepted in it
  (``messages_per_hour``: an hour lies within one UTC day).
- ``limit_hits`` (login, limit, window start): refusals at that limit in that window; its first
  one is the one the mail log names (``limited user=... limit=...``), once per window for the
  whole service.

**Admission is exact.** :meth:`Admissions.admit` runs at the end of DATA, just before the message is
queued, inside a write transaction (``BEGIN IMMEDIATE``: one writer at a time for the whole file,
every worker included): it adds the message to its hour and day and its recipients to the day,
unless that would pass a limit; then nothing is added and the limit is named. Messages that end
their DATA at once share one transaction (group admission, relay/store/admissions.py), so under load
it costs a fraction of a round trip per message. A message not queued after all (a store fault, a
signing error) is taken back by :func:`release`. So however many connections or workers send at
once, no message passes a limit: over-admission is zero. The check at MAIL FROM and RCPT TO
(:func:`snapshot`) only says early what admit would say (it is the answer a client normally sees);
between the two, another session can take the last place, and that message then gets the 451 after
its DATA.

Durability: the file is opened with ``synchronous = NORMAL`` (relay/store/db.py):
no fsync per message; a crash of the process loses nothing, a power loss may lose the last
counts (they come out low). The mail itself is on disk before any 250, through the spool.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from relay import userrules
from relay.config import Config
from relay.store import authfail
from relay.store.db import Database, Migration, StoreError
from relay.store.engine import Store, Tx
from relay.userrules import Limits

USAGE_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        """
        CREATE TABLE usage_days (
            login TEXT NOT NULL,
            day TEXT NOT NULL,
            accepted INTEGER NOT NULL DEFAULT 0,
            recipients INTEGER NOT NULL DEFAULT 0,
            delivered INTEGER NOT NULL DEFAULT 0,
            deferred INTEGER NOT NULL DEFAULT 0,
            bounced INTEGER NOT NULL DEFAULT 0,
            limited INTEGER NOT NULL DEFAULT 0,
            hour REAL NOT NULL DEFAULT 0,
            hour_accepted INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (login, day)
        ) WITHOUT ROWID;
        CREATE TABLE limit_hits (
            login TEXT NOT NULL,
            name TEXT NOT NULL,
            window_start REAL NOT NULL,
            refused INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (login, name, window_start)
        ) WITHOUT ROWID
        """,
    ),
    Migration(2, authfail.MIGRATION_SQL),  # AUTH failures and lockouts (relay/store/authfail.py)
)

KEEP_DAYS = 400  # usage history kept, in days
PRUNE_EVERY = 3600.0  # seconds between prunes of old rows (by a Tally's flush)
OUTCOMES = ("delivered", "deferred", "bounced")


@dataclass(frozen=True)
class Counts:
    """What a user has sent in the windows that hold ``now``."""

    messages_this_hour: int = 0
    messages_today: int = 0
    recipients_today: int = 0


@dataclass(frozen=True)
class Hit:
    """A limit that refuses: its name, its value, and when its window ends."""

    name: str
    limit: int
    resets_at: float


@dataclass(frozen=True)
class DayUsage:
    day: str
    accepted: int = 0
    recipients: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    limited: int = 0

    def as_json(self) -> dict[str, object]:
        return {
            "day": self.day,
            "accepted": self.accepted,
            "recipients": self.recipients,
            "delivered": self.delivered,
            "deferred": self.deferred,
            "bounced": self.bounced,
            "refused_for_limit": self.limited,
        }


def first_hit(limits: Limits, counts: Counts, now: float, recipients: int = 0) -> Hit | None:
    """The limit that one more message with ``recipients`` recipients would pass, or None.
    ``recipients = 0``: only whether a message may start (MAIL FROM)."""
    checks = (
        ("messages_per_hour", counts.messages_this_hour + 1),
        ("messages_per_day", counts.messages_today + 1),
        ("recipients_per_day", counts.recipients_today + max(recipients, 1)),
    )
    for name, wanted in checks:
        limit = limits.get(name)
        if limit and wanted > limit:
            return Hit(name, limit, userrules.window_end(name, now))
    return None


_SNAPSHOT = (
    "SELECT accepted, recipients, CASE WHEN hour = ? THEN hour_accepted ELSE 0 END AS in_hour"
    " FROM usage_days WHERE login = ? AND day = ?"
)


async def snapshot(db: Store, login: str, now: float) -> Counts:
    """The user's counts in the windows holding ``now`` (one read)."""
    row = await db.fetchone(_SNAPSHOT, (userrules.hour_start(now), login, userrules.day_key(now)))
    if row is None:
        return Counts()
    return Counts(row["in_hour"], row["accepted"], row["recipients"])


async def release(db: Store, login: str, recipients: int, admitted_at: float) -> None:
    """Take back a message :func:`admit` counted at ``admitted_at`` that was not queued after
    all (its windows are those of ``admitted_at``, whatever the time now)."""
    hour = userrules.hour_start(admitted_at)
    await db.write_fetchall(
        "UPDATE usage_days SET accepted = CASE WHEN accepted > 0 THEN accepted - 1 ELSE 0 END,"
        " recipients = CASE WHEN recipients > ? THEN recipients - ? ELSE 0 END,"
        " hour_accepted = CASE WHEN hour = ? AND hour_accepted > 0 THEN hour_accepted - 1"
        " WHEN hour = ? THEN 0 ELSE hour_accepted END"
        " WHERE login = ? AND day = ?",
        (recipients, recipients, hour, hour, login, userrules.day_key(admitted_at)),
    )


async def note_refused(db: Store, login: str, hit: Hit, now: float) -> bool:
    """Count a message refused at ``hit``'s limit; True for the first refusal at that limit in
    its window (the one to log), for the whole service."""
    start = hit.resets_at - (userrules.HOUR if hit.name == "messages_per_hour" else userrules.DAY)
    async with db.transaction() as conn:
        row = await conn.fetchone(
            "INSERT INTO limit_hits (login, name, window_start, refused) VALUES (?, ?, ?, 1)"
            " ON CONFLICT (login, name, window_start)"
            " DO UPDATE SET refused = limit_hits.refused + 1 RETURNING refused",
            (login, hit.name, start),
        )
        await conn.execute(
            "INSERT INTO usage_days (login, day, limited) VALUES (?, ?, 1)"
            " ON CONFLICT (login, day) DO UPDATE SET limited = usage_days.limited + 1",
            (login, userrules.day_key(now)),
        )
    return row is None or int(row[0]) == 1


async def history(db: Store, login: str, days: int, now: float) -> list[DayUsage]:
    """The last ``days`` UTC days up to today, oldest first; a day without rows reads as 0."""
    keys = [userrules.day_key(now - i * userrules.DAY) for i in range(days - 1, -1, -1)]
    rows = await db.fetchall(
        "SELECT day, accepted, recipients, delivered, deferred, bounced, limited FROM usage_days"
        " WHERE login = ? AND day >= ? AND day <= ?",
        (login, keys[0], keys[-1]),
    )
    found = {r["day"]: r for r in rows}
    out = []
    for key in keys:
        r = found.get(key)
        out.append(DayUsage(key) if r is None else DayUsage(*(r[i] for i in range(7))))
    return out


async def today_for(db: Store, logins: Sequence[str], now: float) -> Mapping[str, Counts]:
    """:class:`Counts` of many users at once (`user list`)."""
    rows = await db.fetchall(
        "SELECT login, accepted, recipients,"
        " CASE WHEN hour = ? THEN hour_accepted ELSE 0 END AS in_hour"
        " FROM usage_days WHERE day = ?",
        (userrules.hour_start(now), userrules.day_key(now)),
    )
    found = {r["login"]: Counts(r["in_hour"], r["accepted"], r["recipients"]) for r in rows}
    return {login: found.get(login, Counts()) for login in logins}


async def open_usage(cfg: Config) -> Database:
    """The counts' database (created and migrated if need be), commits not fsynced."""
    return await Database.open(cfg.usage_path, USAGE_MIGRATIONS, synchronous="NORMAL")


class Tally:
    """Delivery outcomes per (user, day), kept in memory and added to ``usage_days`` in one
    transaction by :meth:`flush` (the server's periodic task): no store write per recipient."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self._next_prune = 0.0

    def add(self, login: str | None, state: str, now: float) -> None:
        if login is None or state not in OUTCOMES:
            return
        self._pending[(login, userrules.day_key(now))][OUTCOMES.index(state)] += 1

    async def flush(self, db: Store, now: float) -> None:
        """Write what was added; kept for the next flush if the store fails (StoreError)."""
        batch, self._pending = self._pending, defaultdict(lambda: [0, 0, 0])
        try:
            async with db.transaction() as conn:
                if batch:
                    await conn.executemany(
                        "INSERT INTO usage_days (login, day, delivered, deferred, bounced)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (login, day) DO UPDATE SET"
                        " delivered = usage_days.delivered + excluded.delivered,"
                        " deferred = usage_days.deferred + excluded.deferred,"
                        " bounced = usage_days.bounced + excluded.bounced",
                        [(login, day, *n) for (login, day), n in batch.items()],
                    )
                if now >= self._next_prune:
                    await _prune(conn, now)
                    self._next_prune = now + PRUNE_EVERY
        except StoreError as exc:
            for key, counts in batch.items():
                mine = self._pending[key]
                for i, n in enumerate(counts):
                    mine[i] += n
            raise StoreError(f"usage: {exc}") from exc


async def _prune(conn: Tx, now: float) -> None:
    """Forget windows that ended (hits older than two days) and history past KEEP_DAYS."""
    execute = conn.execute
    await execute("DELETE FROM limit_hits WHERE window_start < ?", (now - 2 * userrules.DAY,))
    oldest = userrules.day_key(now - KEEP_DAYS * userrules.DAY)
    await execute("DELETE FROM usage_days WHERE day < ?", (oldest,))
