"""The sandbox inbox: mail of sandbox domains captured instead of delivered, in ``inbox.db``.

Why a SQLite file of its own in the state dir rather than files or the shared database: every worker
(each with its own spool) and the CLI share it with the same guarantees as the rest of the store (a
capture is committed before the spool records the recipient delivered, WAL + busy_timeout across
processes, 0600), the bound and the order are one statement each, and message bodies stay out of
``relaybox.db``, which holds the credentials and is written rarely.

The delivery side (relay/delivery/scheduler.py) calls :meth:`Inbox.capture` once per message and
set of captured recipients; a capture repeated after a crash (the outcome not yet recorded) finds
the first one and adds nothing. At most ``sandbox.inbox_max_messages`` are kept: each capture drops
the oldest beyond that. The operator reads and deletes them with ``relaybox inbox``;
:func:`dkim_result` checks a captured message's signature against its domain's key in the store.
"""

from __future__ import annotations

import asyncio
import email.header
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from relay import dkim, dkimkeys, grammar
from relay.config import Config
from relay.dkim import Verification
from relay.errors import NotFound
from relay.store import domains, events
from relay.store.db import Database, Migration
from relay.store.engine import Store

__all__ = ["INBOX_MIGRATIONS", "Captured", "Inbox", "delete", "dkim_result"]

INBOX_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        """
        CREATE TABLE inbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            captured_at REAL NOT NULL,
            queue_id TEXT NOT NULL,
            domain TEXT NOT NULL,
            sender TEXT NOT NULL,
            recipients TEXT NOT NULL,
            subject TEXT NOT NULL DEFAULT '',
            size INTEGER NOT NULL,
            body BLOB NOT NULL,
            UNIQUE (queue_id, recipients)
        )
        """,
    ),
)

_COLUMNS = "id, captured_at, queue_id, domain, sender, recipients, subject, size"
_SUBJECT_MAX = 200  # characters of the Subject kept for the list (the body has it whole)


@dataclass(frozen=True)
class Captured:
    id: int
    captured_at: float
    queue_id: str  # the message's id in the spool (`relaybox queue show`)
    domain: str  # the sandbox domain it was sent from
    sender: str  # the envelope sender ("" for a bounce)
    recipients: tuple[str, ...]  # the captured ones
    subject: str
    size: int
    body: bytes | None = None  # only from Inbox.get


def _captured(row: sqlite3.Row, body: bytes | None = None) -> Captured:
    return Captured(
        row["id"],
        row["captured_at"],
        row["queue_id"],
        row["domain"],
        row["sender"],
        tuple(json.loads(row["recipients"])),
        row["subject"],
        row["size"],
        body,
    )


def subject_of(message: bytes) -> str:
    """The Subject as a person reads it (RFC 2047 words decoded, folds joined), cut short."""
    fields = grammar.header_fields(message, ("subject",))
    if not fields:
        return ""
    raw = b" ".join(fields[0].value.split()).decode("utf-8", "replace")
    try:
        text = str(email.header.make_header(email.header.decode_header(raw)))
    except (ValueError, LookupError, UnicodeError):
        text = raw
    return text if len(text) <= _SUBJECT_MAX else text[:_SUBJECT_MAX] + "..."


class Inbox:
    """``inbox.db``: see the module docstring."""

    def __init__(self, db: Database, max_messages: int) -> None:
        self.db = db
        self.max_messages = max_messages

    @classmethod
    async def open(cls, cfg: Config) -> Inbox:
        db = await Database.open(cfg.inbox_path, INBOX_MIGRATIONS)
        return cls(db, cfg.sandbox.inbox_max_messages)

    async def close(self) -> None:
        await self.db.close()

    async def capture(
        self,
        *,
        queue_id: str,
        domain: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        now: float,
    ) -> int:
        """Keep ``body`` for ``recipients``; its inbox id once committed (the same id again for
        a capture of the same message and recipients). The oldest beyond the bound are dropped."""
        rcpts = json.dumps(list(recipients), ensure_ascii=False)
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT OR IGNORE INTO inbox (captured_at, queue_id, domain, sender, recipients, "
                "subject, size, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (now, queue_id, domain, sender, rcpts, subject_of(body), len(body), body),
            )
            rows = await conn.execute_fetchall(
                "SELECT id FROM inbox WHERE queue_id = ? AND recipients = ?", (queue_id, rcpts)
            )
            await conn.execute(
                "DELETE FROM inbox WHERE id IN "
                "(SELECT id FROM inbox ORDER BY id DESC LIMIT -1 OFFSET ?)",
                (self.max_messages,),
            )
        return int(next(iter(rows))[0])

    async def list_all(self, limit: int | None = None) -> list[Captured]:
        """The captured messages, newest first, without their bodies."""
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM inbox ORDER BY id DESC LIMIT ?",
            (-1 if limit is None else limit,),
        )
        return [_captured(r) for r in rows]

    async def count(self) -> int:
        row = await self.db.fetchone("SELECT count(*) AS n FROM inbox")
        return 0 if row is None else int(row["n"])

    async def get(self, inbox_id: int) -> Captured:
        row = await self.db.fetchone(
            f"SELECT {_COLUMNS}, body FROM inbox WHERE id = ?", (inbox_id,)
        )
        if row is None:
            raise NotFound(f"no message {inbox_id} in the inbox")
        return _captured(row, bytes(row["body"]))

    async def remove(self, inbox_id: int | None) -> int:
        """Delete one message (NotFound if it is not there) or, with None, all; how many."""
        async with self.db.transaction() as conn:
            if inbox_id is None:
                cur = await conn.execute("DELETE FROM inbox")
            else:
                cur = await conn.execute("DELETE FROM inbox WHERE id = ?", (inbox_id,))
                if cur.rowcount == 0:
                    raise NotFound(f"no message {inbox_id} in the inbox")
            return cur.rowcount


async def delete(
    inbox: Inbox, inbox_id: int | None, *, audit: Store, now: float, actor: str
) -> int:
    """The operator's delete (one message, or every one with None): audited in ``audit`` as
    ``inbox.delete`` once done; returns how many were deleted."""
    n = await inbox.remove(inbox_id)
    target = "all" if inbox_id is None else str(inbox_id)
    await events.record(
        audit, now=now, actor=actor, action="inbox.delete", target=target, detail=f"messages={n}"
    )
    return n


async def dkim_result(main: Store, message: bytes) -> Verification:
    """Verify ``message``'s first DKIM signature against the key that the domain it names has
    in the store now (no DNS: what a receiver would see had its records been published). A
    domain removed or added again since has no key or another one: the result says so."""
    signed = dkim.signature_of(message)
    keys: dict[str, str] = {}
    if signed is not None:
        domain = await domains.get(main, signed[0])
        if domain is not None and domain.dkim_selector.lower() == signed[1]:
            name = dkim.key_name(domain.name, signed[1])
            keys[name] = dkimkeys.txt_value(domain.dkim_algorithm, domain.dkim_public_key)
    return await asyncio.to_thread(dkim.verify, message, keys)  # RSA in pure Python
