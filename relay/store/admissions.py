"""Group admission of messages against their users' sending limits (relay/store/usage.py's
counts): what makes a limit exact for the whole service at a fraction of a round trip per message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from relay import userrules
from relay.store.db import Statement, StoreError
from relay.store.engine import Row, Store
from relay.store.usage import Counts, Hit, first_hit
from relay.userrules import Limits


@dataclass
class _Request:
    login: str
    recipients: int
    limits: Limits
    now: float
    future: asyncio.Future[Hit | None]


_READ_DAYS = "SELECT login, day, accepted, recipients, hour, hour_accepted FROM usage_days WHERE "
_WRITE_DAY = (
    "INSERT INTO usage_days (login, day, accepted, recipients, hour, hour_accepted)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (login, day) DO UPDATE SET"
    " accepted = excluded.accepted, recipients = excluded.recipients,"
    " hour = excluded.hour, hour_accepted = excluded.hour_accepted"
)
MAX_BATCH = 256
RECENT = 1.0  # seconds MAIL FROM trusts the counts the last admission left (no read)
MAX_RECENT = 10000  # logins remembered so; past it the memory starts again


class Admissions:
    """Group admission: the messages that end their DATA while a batch is being written go into
    the next one, and a batch is one write transaction (BEGIN IMMEDIATE, one read of the rows it
    touches, one ``executemany``, COMMIT: one trip to the database's thread on SQLite, where the
    decision runs; four round trips on PostgreSQL), never one per message (DESIGN.md's group
    commit, as the spool's writer does). Inside the transaction every other writer of usage.db
    waits, so each message is decided on the exact counts, in the order the messages arrived:
    no limit is passed, whatever the concurrency.
    """

    def __init__(self, db: Store) -> None:
        self.db = db
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0  # transactions written (<< messages under load)
        self.admitted = 0
        # login -> (when, day, hour, counts) as the last batch left them: MAIL FROM's early
        # answer without a read while they are fresh (the exact answer is the admission's).
        self._latest: dict[str, tuple[float, str, float, Counts]] = {}

    def recent(self, login: str, now: float, within: float = RECENT) -> Counts | None:
        """The user's counts as this process's last admission saw them, if that was less than
        ``within`` seconds ago and in the windows of ``now``; else None (read them)."""
        seen = self._latest.get(login)
        if seen is None:
            return None
        at, day, hour, counts = seen
        if now - at >= within or day != userrules.day_key(now):
            return None
        if hour != userrules.hour_start(now):
            return Counts(0, counts.messages_today, counts.recipients_today)
        return counts

    async def admit(self, login: str, recipients: int, limits: Limits, now: float) -> Hit | None:
        """Count one message of ``recipients`` recipients, unless it would pass a limit: then
        count nothing and return that limit."""
        lone = first_hit(limits, Counts(), now, recipients)  # more than a day's recipients
        if lone is not None:
            return lone
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name="relaybox-admissions"
            )
        future: asyncio.Future[Hit | None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(login, recipients, limits, now, future))
        return await future

    def forget(self, login: str) -> None:
        """Drop what :meth:`recent` knows of ``login`` (a message of it was taken back)."""
        self._latest.pop(login, None)

    async def close(self) -> None:
        if self._writer is not None and not self._writer.done():
            self._queue.put_nowait(None)
            await self._writer

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                results = await self._decide(batch)
            except Exception as exc:  # the batch fails alike; the writer carries on
                err = exc if isinstance(exc, StoreError) else StoreError(f"usage: {exc}")
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(err)
            else:
                self.batches += 1
                for req, hit in zip(batch, results, strict=True):
                    if not req.future.done():  # its session went away: counted all the same
                        req.future.set_result(hit)
            if stop:
                return

    async def _decide(self, batch: list[_Request]) -> list[Hit | None]:
        keys = sorted({(r.login, userrules.day_key(r.now)) for r in batch})
        where = " OR ".join(["(login = ? AND day = ?)"] * len(keys))
        flat = [v for key in keys for v in key]
        # Read here, on the loop: the decision may run in the database's thread (SQLite).
        wanted = [
            None if r.future.done() else (r.login, r.recipients, r.limits, r.now) for r in batch
        ]
        # (login, day) -> [accepted, recipients, hour, hour_accepted], as the batch leaves them
        state: dict[tuple[str, str], list[Any]] = {}

        def decide(rows: list[Row]) -> tuple[list[Hit | None], list[Statement]]:
            state.clear()  # a retried transaction starts again from what it read
            state.update({(r[0], r[1]): [r[2], r[3], r[4], r[5]] for r in rows})
            results: list[Hit | None] = []
            for want in wanted:
                if want is None:  # its session went away before its turn: not counted
                    results.append(None)
                    continue
                login, recipients, limits, now = want
                day, hour = userrules.day_key(now), userrules.hour_start(now)
                row = state.setdefault((login, day), [0, 0, hour, 0])
                in_hour = row[3] if row[2] == hour else 0
                hit = first_hit(limits, Counts(in_hour, row[0], row[1]), now, recipients)
                results.append(hit)
                if hit is None:
                    row[0] += 1
                    row[1] += recipients
                    row[2], row[3] = hour, in_hour + 1
            touched = [(login, day, *v) for (login, day), v in state.items()]
            return results, [(_WRITE_DAY, touched)]

        results = await self.db.read_then_write(_READ_DAYS + where, flat, decide)
        self.admitted += sum(1 for w, hit in zip(wanted, results, strict=True) if w and hit is None)
        if len(self._latest) > MAX_RECENT:
            self._latest.clear()
        at = batch[-1].now
        for (login, day), (accepted, rcpts, hour, in_hour) in state.items():
            self._latest[login] = (at, day, hour, Counts(in_hour, accepted, rcpts))
        return results


async def admit(db: Store, login: str, recipients: int, limits: Limits, now: float) -> Hit | None:
    """One admission on its own, a batch of one (tools and tests; the server keeps one
    :class:`Admissions` for all its sessions)."""
    admissions = Admissions(db)
    try:
        return await admissions.admit(login, recipients, limits, now)
    finally:
        await admissions.close()
