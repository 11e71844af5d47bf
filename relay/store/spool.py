"""The durable queue: accepted messages and their per-recipient delivery state, in SQLite.

A 250 after DATA promises the message survives a crash, so :meth:`Spool.enqueue` returns only after
the COMMIT that holds the message (``synchronous=FULL``, WAL). Every write of the hot path
(enqueue, claim, delivery outcome) goes through ONE writer task with group commit: whatever was
submitted while the previous COMMIT ran is written in the next transaction, a handful of
``executemany`` round trips per batch however large it is, so one fsync covers many messages
without any timer.

Each worker process owns one spool file (``spool-<worker>.db``) and one deliverer. A recipient is
*due* when ``next_attempt_at <= now``; claiming it for delivery sets ``next_attempt_at`` to NULL and
``claimed_at`` (the in-flight marker), so it leaves the partial due index. Opening the spool after a
crash puts everything that was in flight back to due now. Once every recipient of a message is
final (delivered or bounced) the message is *done*: its body is dropped and its envelope kept for
``queue show`` until ``spool.retention`` passes, then purged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay import clock as clock_mod
from relay import grammar
from relay.clock import Clock
from relay.config import Config
from relay.errors import Invalid
from relay.store import outbox
from relay.store.db import Database, Statement, StoreError, in_thread
from relay.store.outbox import Attempt, EventRow
from relay.store.spool_admin import (
    FINAL,
    NEXT_DUE,
    PENDING,
    STATES,
    MessageInfo,
    RecipientInfo,
    SpoolAdmin,
    Stats,
)
from relay.store.spool_rows import (
    CLAIM,
    DueRecipient,
    Message,
    NewMessage,
    Outcome,
    StreamedBody,
    claim,
    new_id,
    write_body,
)
from relay.store.spool_schema import SPOOL_MIGRATIONS

log = logging.getLogger("relaybox.spool")

__all__ = [
    "FINAL",
    "PENDING",
    "SPOOL_MIGRATIONS",
    "STATES",
    "DueRecipient",
    "Message",
    "MessageInfo",
    "NewMessage",
    "Outcome",
    "RecipientInfo",
    "Spool",
    "Stats",
    "StreamedBody",
    "new_id",
]

MAX_BATCH_OPS = 1024  # bounds one transaction (and the time others wait for the write lock)

_INSERT_MESSAGE = (
    "INSERT INTO messages (id, sender, user, size, created_at, body, sandbox) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# A body on disk (a large message read by DATA): room for it in the row, then written into it.
_INSERT_STREAMED = (
    "INSERT INTO messages (id, sender, user, size, created_at, body, sandbox) "
    "VALUES (?, ?, ?, ?, ?, zeroblob(?), ?)"
)
_INSERT_RECIPIENT = (
    "INSERT INTO recipients (message_id, idx, address, domain, next_attempt_at, capture) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_OUTCOME = (
    "UPDATE recipients SET state = ?, attempts = attempts + 1, next_attempt_at = ?, "
    "claimed_at = NULL, last_attempt_at = ?, last_code = ?, last_reply = ?, relay = ? "
    "WHERE message_id = ? AND idx = ?"
)
_RELEASE = (
    "UPDATE recipients SET next_attempt_at = ?, claimed_at = NULL "
    "WHERE message_id = ? AND idx = ? AND claimed_at IS NOT NULL"
)
_DONE = (
    "UPDATE messages SET done_at = ?, body = NULL WHERE id = ? AND NOT EXISTS "
    "(SELECT 1 FROM recipients WHERE message_id = ? AND state IN ('queued', 'deferred'))"
)
# The queries that run per delivery batch at any queue size; query_plans() shows they use indexes.
HOT_QUERIES = {"claim": CLAIM, "next_due": NEXT_DUE}


@dataclass
class _Op:
    """One submitted write; the writer merges many into one transaction."""

    messages: list[tuple[Any, ...]] = field(default_factory=list)
    streamed: list[tuple[Any, ...]] = field(default_factory=list)  # rows of bodies on disk...
    tails: list[tuple[str, bytes, StreamedBody]] = field(default_factory=list)  # ...and those
    recipients: list[tuple[Any, ...]] = field(default_factory=list)
    outcomes: list[tuple[Any, ...]] = field(default_factory=list)
    releases: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)  # webhook outbox rows (outbox.py)
    posted: list[Attempt] = field(default_factory=list)  # and outcomes of their posts
    touched: set[str] = field(default_factory=set)
    claim: tuple[float, int] | None = None
    result: Any = None
    future: asyncio.Future[Any] | None = None


class Spool(SpoolAdmin):
    """One worker's spool file; see the module docstring (reads and admin: SpoolAdmin)."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self._clock = clock
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0  # transactions written by the writer (group commit: << ops under load)
        self.batched_ops = 0
        self.events_written: Callable[[], None] | None = None  # the poster's wake-up

    @classmethod
    async def open(
        cls,
        cfg: Config,
        *,
        worker: int = 0,
        clock: Clock = clock_mod.system,
        recover: bool = True,
    ) -> Spool:
        """Open (creating or migrating) the worker's spool file and start its writer.

        ``recover=False`` is for the admin CLI, which may run while the server delivers: it must
        not put the server's in-flight recipients back to due.
        """
        db = await Database.open(cfg.spool_path(worker), SPOOL_MIGRATIONS)
        spool = cls(db, clock)
        if recover:
            n = await spool._recover()
            if n:
                log.info("spool recovery: %d recipient(s) were in flight, due again now", n)
        spool._writer = asyncio.create_task(spool._write_loop(), name="spool-writer")
        return spool

    async def close(self) -> None:
        """Write what is already submitted, stop the writer, close the database."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put_nowait(None)
            await self._writer
        await self.db.close()

    # --- the hot path, through the writer ----------------------------------------------------

    async def enqueue(
        self,
        *,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        user: str | None,
        sandbox: str | None = None,
        allowed: frozenset[str] = frozenset(),
        events: Callable[[str], Sequence[EventRow]] | None = None,
        tail: StreamedBody | None = None,
    ) -> str:
        """Queue a message; returns its id once the COMMIT holding it returned. A ``sandbox``
        domain's recipients are captured, except those in ``allowed`` (see NewMessage).
        ``events(id)``: its webhook events, written in the same transaction. ``tail``: the
        rest of the message after ``body``, on disk; copied into the row in that transaction, and
        closed by the spool (from this call on it is the spool's, whatever happens)."""
        op = _Op()
        new = NewMessage(sender, tuple(recipients), body, user, sandbox, allowed, tail)
        try:
            msg_id = self._add_message(op, new)
            if events is not None:
                op.events.extend(events(msg_id))
        except BaseException:
            if tail is not None:
                tail.close()
            raise
        await self._submit(op)
        return msg_id

    async def claim_due(self, limit: int) -> list[DueRecipient]:
        """Take up to about ``limit`` due recipients (all due ones of each message) in flight."""
        op = _Op(claim=(self._clock(), max(1, limit)))
        result: list[DueRecipient] = await self._submit(op)
        return result

    async def record(
        self,
        outcomes: Iterable[Outcome],
        *,
        bounce: NewMessage | None = None,
        events: Sequence[EventRow] = (),
    ) -> str | None:
        """Record attempt outcomes, and queue their bounce and write their webhook ``events``
        in the same transaction (the bounce's id)."""
        now = self._clock()
        op = _Op(events=list(events))
        for o in outcomes:
            if o.state not in ("delivered", "deferred", "bounced"):
                raise ValueError(f"not an outcome state: {o.state}")
            nxt = o.next_attempt_at if o.state == "deferred" else None
            if o.state == "deferred" and nxt is None:
                nxt = now
            op.outcomes.append((o.state, nxt, now, o.code, o.reply, o.relay, o.message_id, o.idx))
            op.touched.add(o.message_id)
        bounce_id = self._add_message(op, bounce) if bounce is not None else None
        await self._submit(op)
        return bounce_id

    async def write_outbox(
        self, events: Sequence[EventRow] = (), posted: Sequence[Attempt] = ()
    ) -> None:
        """Webhook events of a change made elsewhere (a RCPT refused as suppressed), or what
        posts came to (relay/delivery/poster.py): group-committed with the rest."""
        await self._submit(_Op(events=list(events), posted=list(posted)))

    def now(self) -> float:
        return self._clock()

    async def release(self, items: Iterable[tuple[str, int]]) -> None:
        """Give claimed recipients back unattempted (shutdown): due now, no attempt counted."""
        now = self._clock()
        op = _Op(releases=[(now, mid, idx) for mid, idx in items])
        if op.releases:
            await self._submit(op)

    def _add_message(self, op: _Op, m: NewMessage) -> str:
        if not m.recipients:
            raise Invalid("a message needs at least one recipient")
        now = self._clock()
        msg_id = new_id(now)
        if m.tail is None:
            op.messages.append((msg_id, m.sender, m.user, m.size, now, m.body, m.sandbox))
        else:
            op.streamed.append((msg_id, m.sender, m.user, m.size, now, m.size, m.sandbox))
            op.tails.append((msg_id, m.body, m.tail))
        for i, rcpt in enumerate(m.recipients):
            capture = m.sandbox is not None and rcpt not in m.allowed
            op.recipients.append((msg_id, i, rcpt, grammar.domain_part(rcpt), now, int(capture)))
        return msg_id

    async def _submit(self, op: _Op) -> Any:
        if self._closed or self._writer is None or self._writer.done():
            for _, _, tail in op.tails:  # never reaches the writer, which would close them
                tail.close()
            raise StoreError("spool is closed")
        op.future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(op)
        return await op.future

    async def _write_loop(self) -> None:
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH_OPS and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                await self._write_batch(batch)
            except Exception as exc:  # every op of the batch fails alike; the writer carries on
                err = exc if isinstance(exc, StoreError) else StoreError(f"spool write: {exc}")
                log.error("spool write failed (%d op(s)): %s", len(batch), exc)
                for op in batch:
                    if op.future is not None and not op.future.done():
                        op.future.set_exception(err)
                continue
            self.batches += 1
            self.batched_ops += len(batch)
            if self.events_written is not None and any(op.events for op in batch):
                self.events_written()
            for op in batch:
                if op.future is not None and not op.future.done():
                    op.future.set_result(op.result)

    async def _write_batch(self, batch: list[_Op]) -> None:
        def merged(attr: str) -> list[Any]:
            return [row for op in batch for row in getattr(op, attr)]

        messages, recipients = merged("messages"), merged("recipients")
        streamed, tails = merged("streamed"), merged("tails")
        outcomes, releases = merged("outcomes"), merged("releases")
        events, posted = merged("events"), merged("posted")
        touched = {mid for op in batch for mid in op.touched}
        if not streamed and not tails and all(op.claim is None for op in batch):  # one trip
            statements: list[Statement] = [
                (sql, rows)
                for sql, rows in (
                    (_INSERT_MESSAGE, messages), (_INSERT_RECIPIENT, recipients),
                    (_OUTCOME, outcomes), (_RELEASE, releases),
                )
                if rows
            ]  # fmt: skip
            if events:
                statements.append(outbox.insert_statement(events))
            if posted:
                statements.append(outbox.record_statement(posted))
            if touched:
                now = self._clock()
                statements.append((_DONE, [(now, mid, mid) for mid in touched]))
            await self.db.write_statements(statements)
            return
        try:
            async with self.db.transaction() as conn:
                if messages:
                    await conn.executemany(_INSERT_MESSAGE, messages)
                if streamed:
                    await conn.executemany(_INSERT_STREAMED, streamed)
                    for msg_id, start, tail in tails:
                        await in_thread(conn, functools.partial(write_body, msg_id, start, tail))
                if recipients:
                    await conn.executemany(_INSERT_RECIPIENT, recipients)
                if outcomes:
                    await conn.executemany(_OUTCOME, outcomes)
                if releases:
                    await conn.executemany(_RELEASE, releases)
                if events:
                    await outbox.insert(conn, events)
                if posted:
                    await outbox.record_in(conn, posted)
                if touched:
                    now = self._clock()
                    await conn.executemany(_DONE, [(now, mid, mid) for mid in touched])
                for op in batch:
                    if op.claim is not None:
                        now, limit = op.claim
                        op.result = await claim(conn, now, limit)
        except sqlite3.Error as exc:
            raise StoreError(f"spool write: {exc}") from exc
        finally:  # the tails are the spool's from enqueue on: written or failed, closed here
            for _, _, tail in tails:
                tail.close()

    async def _recover(self) -> int:
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE recipients SET next_attempt_at = ?, claimed_at = NULL "
                "WHERE claimed_at IS NOT NULL",
                (self._clock(),),
            )
            return cur.rowcount

    # --- reads ---------------------------------------------------------------------------------

    async def load(self, message_id: str) -> Message | None:
        r = await self.db.fetchone(
            "SELECT id, sender, user, size, created_at, body, sandbox FROM messages WHERE id = ?",
            (message_id,),
        )
        if r is None:
            return None
        body = bytes(r["body"]) if r["body"] is not None else None
        fields = (r["id"], r["sender"], r["user"], r["size"], r["created_at"])
        return Message(*fields, body, r["sandbox"])

    async def query_plans(self) -> dict[str, list[str]]:
        """EXPLAIN QUERY PLAN of the hot queries (a test checks none is a full-table SCAN)."""
        plans: dict[str, list[str]] = {}
        for name, sql in HOT_QUERIES.items():
            rows = await self.db.fetchall("EXPLAIN QUERY PLAN " + sql, {"now": 0.0, "limit": 1})
            plans[name] = [str(r[3]) for r in rows]
        return plans
