"""From a complete message to "250 queued as <id>": the sender domain's state and signing key
(cached briefly), DKIM signing, the durable enqueue, and a wake-up for delivery."""

from __future__ import annotations

import time
from collections.abc import Callable

from relay.dkim import Signer
from relay.metrics import Metrics
from relay.store import domains
from relay.store.db import Database
from relay.store.domains import SigningKey
from relay.store.spool import Spool

DOMAIN_CACHE_TTL = 10.0  # seconds a domain's state/key is trusted before it is read again


class Acceptor:
    def __init__(
        self,
        db: Database,
        spool: Spool,
        metrics: Metrics,
        *,
        wake: Callable[[], None],
        signer: Signer | None = None,
    ) -> None:
        self.db = db
        self.spool = spool
        self.metrics = metrics
        self.wake = wake
        self.signer = signer or Signer()
        self._cache: dict[str, tuple[float, str | None, SigningKey | None]] = {}

    async def _domain(self, name: str) -> tuple[str | None, SigningKey | None]:
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and now - hit[0] < DOMAIN_CACHE_TTL:
            return hit[1], hit[2]
        d = await domains.get(self.db, name)
        key = await domains.signing_key(self.db, name) if d is not None else None
        state = d.state if d is not None else None
        self._cache[name] = (now, state, key)
        return state, key

    async def domain_state(self, name: str) -> str | None:
        """The domain's verification state (None: not a domain of ours)."""
        state, _key = await self._domain(name)
        return state

    def forget(self) -> None:
        """Drop what the cache holds (after a recheck changed states)."""
        self._cache.clear()

    async def accept(
        self, domain: str, sender: str, recipients: list[str], message: bytes, user: str
    ) -> str:
        """Sign and queue; returns the queue id once the message is committed to disk.

        ``message`` has passed the DATA checks (relay.smtp.policy.check_header), its field names
        written the modern way (relay.grammar.modern_field_names), so the signer reads the fields
        the policy read. What the signer cannot sign raises SigningError (HeaderError when it is
        the header) to the DATA handler, which answers it; nothing is queued then."""
        _state, key = await self._domain(domain)
        if key is not None:
            message = await self.signer.sign_async(message, key)
        msg_id = await self.spool.enqueue(
            sender=sender, recipients=recipients, body=message, user=user
        )
        self.metrics.accepted(len(recipients), len(message))
        self.wake()
        return msg_id
