"""From a complete message to "250 queued as <id>": the sender domain's state and signing key
(cached briefly), DKIM signing, the durable enqueue, and a wake-up for delivery.

A sandbox domain's message (relay/store/sandbox.py) is marked so when it is queued: the domain, and
which recipients the operator allows out (every other one is captured into the inbox). Delivery
reads only that mark, so no later change of the domain can let mail already queued out."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from relay import maillog, replies, webhook
from relay.dkim import Signer
from relay.errors import Invalid
from relay.metrics import Metrics
from relay.signproc import KeyProcess
from relay.smtp.spill import Spill
from relay.store import domains, sandbox
from relay.store.db import StoreError
from relay.store.domains import SigningKey
from relay.store.engine import Store
from relay.store.outbox import EventRow
from relay.store.spool import Spool
from relay.store.webhooks import Subscriptions

log = logging.getLogger("relaybox.accept")

DOMAIN_CACHE_TTL = 10.0  # seconds a domain's state/key is trusted before it is read again


@dataclass(frozen=True)
class _Cached:
    at: float
    name: str  # as stored (A-label, lowercase)
    state: str | None  # None: not a domain of ours
    key: SigningKey | None
    sandbox: bool
    allowed: frozenset[str]  # a sandbox domain's allowed recipients (sandbox.address_key form)


def allowed_of(recipients: Sequence[str], allowed: frozenset[str]) -> frozenset[str]:
    """The recipients (as given) that a sandbox domain's allow list names; an address that is
    not one (no key) is never among them."""
    out: set[str] = set()
    for rcpt in recipients:
        try:
            key = sandbox.address_key(rcpt)
        except Invalid:
            continue
        if key in allowed:
            out.add(rcpt)
    return frozenset(out)


class Acceptor:
    def __init__(
        self,
        db: Store,
        spool: Spool,
        metrics: Metrics,
        *,
        wake: Callable[[], None],
        signer: Signer | None = None,
        subscriptions: Subscriptions | None = None,
        key_process: KeyProcess | None = None,
    ) -> None:
        """``subscriptions``: the webhook endpoints (message.accepted and .suppressed);
        ``key_process``: where the signer makes private-key steps (relay.signproc)."""
        self.db = db
        self.subscriptions = subscriptions or Subscriptions()
        self.spool = spool
        self.metrics = metrics
        self.wake = wake
        self.signer = signer or Signer(key_process=key_process)
        self._cache: dict[str, _Cached] = {}

    async def _domain(self, name: str) -> _Cached:
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and now - hit.at < DOMAIN_CACHE_TTL:
            return hit
        d = await domains.get(self.db, name)
        key = await domains.signing_key(self.db, name) if d is not None else None
        is_sandbox = d is not None and d.sandbox
        allowed = frozenset(await sandbox.allowed(self.db, name)) if is_sandbox else frozenset()
        state = d.state if d is not None else None
        entry = _Cached(now, d.name if d is not None else name, state, key, is_sandbox, allowed)
        self._cache[name] = entry
        return entry

    async def domain_state(self, name: str) -> str | None:
        """The domain's verification state (None: not a domain of ours)."""
        return (await self._domain(name)).state

    def forget(self) -> None:
        """Drop what the cache holds (after a recheck changed states)."""
        self._cache.clear()

    async def accept(
        self,
        domain: str,
        sender: str,
        recipients: list[str],
        message: bytes,
        user: str,
        tail: Spill | None = None,
        before_queue: Callable[[], Awaitable[None]] | None = None,
    ) -> str:
        """Sign and queue; returns the queue id once the message is committed to disk.
        ``tail``: a large message's body, on disk (then ``message`` is its header section).
        ``before_queue``: awaited once signed, before anything is queued (the DATA handler's
        admission, made while the message was being signed); what it raises queues nothing.

        ``message`` has passed the DATA checks (relay.smtp.policy.check_header), its field names
        written the modern way (relay.grammar.modern_field_names), so the signer reads the fields
        the policy read. What the signer cannot sign raises SigningError (HeaderError when it is
        the header) to the DATA handler, which answers it; nothing is queued then."""
        d = await self._domain(domain)
        if d.key is not None:
            body_hash = tail.body_hash if tail is not None else None
            message = await self.signer.sign_async(message, d.key, body_hash)
        if before_queue is not None:
            await before_queue()
        allowed = allowed_of(recipients, d.allowed) if d.sandbox else frozenset()
        events = None
        if self.subscriptions.wanted("message.accepted", d.name):
            events = self._accepted(d.name, sender, recipients, message, user)
        msg_id = await self.spool.enqueue(
            sender=sender,
            recipients=recipients,
            body=message,
            user=user,
            sandbox=d.name if d.sandbox else None,
            allowed=allowed,
            events=events,
            tail=tail.handoff() if tail is not None else None,
        )
        self.metrics.accepted(len(recipients), len(message) + (tail.size if tail else 0))
        if d.sandbox:
            self.metrics.sandbox_accepted()
            captured = len(recipients) - len(allowed)
            maillog.event(
                "sandbox", id=msg_id, domain=d.name, captured=captured, allowed=len(allowed)
            )
        self.wake()
        return msg_id

    def _accepted(
        self, domain: str, sender: str, recipients: list[str], message: bytes, user: str
    ) -> Callable[[str], list[EventRow]]:
        """message.accepted per recipient, once the queue id is known (in the enqueue)."""
        mid = webhook.message_id_of(message)

        def rows(queue_id: str) -> list[EventRow]:
            now, reply = self.spool.now(), str(replies.QUEUED.fill(id=queue_id))
            out: list[EventRow] = []
            for rcpt in recipients:
                data = webhook.message_data(
                    queue_id=queue_id, message_id=mid, user=user, sender=sender,
                    recipient=rcpt, attempt=0, remote_host=None, reply=reply,
                )  # fmt: skip
                out += self.subscriptions.rows("message.accepted", domain, data, now)
            return out

        return rows

    async def suppressed(
        self, user: str, domain: str, sender: str, recipient: str, reply: str
    ) -> None:
        """message.suppressed: a RCPT TO refused as suppressed, for the endpoints that want it
        (a small write of its own; a failure is logged, the refusal stands)."""
        if not self.subscriptions.wanted("message.suppressed", domain):
            return
        data = webhook.message_data(
            queue_id=None, message_id=None, user=user, sender=sender,
            recipient=recipient, attempt=0, remote_host=None, reply=reply,
        )  # fmt: skip
        rows = self.subscriptions.rows("message.suppressed", domain, data, self.spool.now())
        try:
            await self.spool.write_outbox(rows)
        except StoreError as exc:
            log.error("could not write a message.suppressed event: %s", exc)
