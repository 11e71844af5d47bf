"""The service's webhook part: the endpoint list every stage asks, and a poster per spool file.

Started with the service (after its spools open), stopped before they close. The endpoints
(relay/store/webhooks.py's :class:`Subscriptions`) are read at start, every ``[webhooks]
refresh_interval`` and at SIGHUP (:meth:`Webhooks.reload`), which also wakes the posters (a
``webhook replay`` from the CLI is posted at once). Worker 0 posts the outbox of spool files
that no worker owns any more, as it delivers their queue.
"""

from __future__ import annotations

import asyncio
import logging

from relay import clock as clock_mod
from relay.clock import Clock
from relay.config import Config
from relay.delivery.poster import Poster
from relay.metrics import Metrics
from relay.store.db import StoreError
from relay.store.engine import Store
from relay.store.spool import Spool
from relay.store.webhooks import Subscriptions

log = logging.getLogger("relaybox.webhooks")


class Webhooks:
    def __init__(
        self, cfg: Config, *, clock: Clock = clock_mod.system, metrics: Metrics | None = None
    ) -> None:
        self.cfg = cfg
        self.subscriptions = Subscriptions()
        self.posters: list[Poster] = []
        self._clock = clock
        self._metrics = metrics
        self._db: Store | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def open(self, db: Store) -> None:
        """Read the endpoints from the shared ``db`` (a failure is logged: read again later)."""
        self._db = db
        await self.refresh()

    async def refresh(self) -> None:
        if self._db is None:
            return
        try:
            await self.subscriptions.refresh(self._db)
        except StoreError as exc:
            log.warning("webhooks: cannot read the endpoints: %s", exc)
            return
        for poster in self.posters:
            poster.wake()

    def start(self, spools: list[Spool]) -> None:
        """A poster for each spool (the worker's own first), woken when events are written."""
        for spool in spools:
            name = spool.db.path.stem
            poster = Poster(
                spool, self.subscriptions, self.cfg, name=name, clock=self._clock,
                metrics=self._metrics,
            )  # fmt: skip
            spool.events_written = poster.wake
            poster.start()
            self.posters.append(poster)
        self._refresher = asyncio.get_running_loop().create_task(
            self._refresh_loop(), name="webhooks-refresh"
        )

    async def reload(self, cfg: Config) -> None:
        self.cfg = cfg
        for poster in self.posters:
            poster.configure(cfg)
        await self.refresh()

    async def stop(self) -> None:
        """Stop the posters (what they were posting stays pending for the next start)."""
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        for poster in self.posters:
            await poster.stop()
        self.posters = []

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(float(self.cfg.webhooks.refresh_interval))  # sleep-ok: a timer
            await self.refresh()
