"""The spool file's schema: its tables and their migrations (applied by relay/store/db.py).

Split from relay/store/spool.py, whose SQL reads and writes these tables (with
relay/store/spool_admin.py). Migrations only add: a spool left by an older release opens with its
queue as it was.
"""

from __future__ import annotations

from relay.store.db import Migration

SPOOL_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        """
        CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            sender TEXT NOT NULL,
            user TEXT,
            size INTEGER NOT NULL,
            created_at REAL NOT NULL,
            done_at REAL,
            body BLOB
        );
        CREATE INDEX messages_created ON messages(created_at);
        CREATE INDEX messages_done ON messages(done_at) WHERE done_at IS NOT NULL;
        CREATE TABLE recipients (
            message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            address TEXT NOT NULL,
            domain TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'queued'
                CHECK (state IN ('queued', 'deferred', 'delivered', 'bounced')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL,
            claimed_at REAL,
            last_attempt_at REAL,
            last_code INTEGER,
            last_reply TEXT,
            relay TEXT,
            PRIMARY KEY (message_id, idx)
        ) WITHOUT ROWID;
        CREATE INDEX recipients_due ON recipients(next_attempt_at)
            WHERE next_attempt_at IS NOT NULL;
        CREATE INDEX recipients_claimed ON recipients(claimed_at) WHERE claimed_at IS NOT NULL;
        CREATE INDEX recipients_state ON recipients(state)
        """,
    ),
    # A sandbox domain's message (relay/store/sandbox.py): messages.sandbox names the domain,
    # recipients.capture marks those delivered into the inbox instead of to the Internet. Both
    # are set at enqueue: what the accept side decided is what delivery does.
    Migration(
        2,
        """
        ALTER TABLE messages ADD COLUMN sandbox TEXT;
        ALTER TABLE recipients ADD COLUMN capture INTEGER NOT NULL DEFAULT 0
        """,
    ),
    # The webhook outbox (relay/store/outbox.py): this node's events waiting to be posted,
    # written in the transaction of the change each reports. Portable SQL (no rowid tricks):
    # the same table on PostgreSQL.
    Migration(
        3,
        """
        CREATE TABLE outbox (
            event_id TEXT NOT NULL,
            endpoint_id TEXT NOT NULL,
            type TEXT NOT NULL,
            body TEXT NOT NULL,
            created_at REAL NOT NULL,
            retry_from REAL NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'delivered', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL,
            last_attempt_at REAL,
            last_status INTEGER,
            last_error TEXT,
            PRIMARY KEY (event_id, endpoint_id)
        );
        CREATE INDEX outbox_due ON outbox(next_attempt_at) WHERE next_attempt_at IS NOT NULL;
        CREATE INDEX outbox_created ON outbox(created_at)
        """,
    ),
)
