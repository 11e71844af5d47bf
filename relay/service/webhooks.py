"""The service's webhook part: the endpoint list every stage asks, and a poster per spool file.

Started with the service (after its spools open), stopped before they close. The endpoints
(relay/store/webhooks.py's :class:`Subscriptions`) are read at start, every ``[webhooks]
refresh_interval`` and at SIGHUP (:meth:`Webhooks.reload`), which also wakes the posters (a
``webhook replay`` from the CLI is posted at once). Worker 0 posts the outbox of spool files
that no worker owns any more, as it delivers their queue.

Where the posters run: with ``poster_command`` (``relaybox serve`` sets it) in a child process of
the worker, :class:`PosterProcess` (relay/service/posterproc.py), so HTTP never takes the SMTP
loop's time; without it (a server embedded in a test, with its own clock) in this loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from relay import clock as clock_mod
from relay import restart
from relay.clock import Clock
from relay.config import Config
from relay.delivery.poster import Poster
from relay.metrics import Metrics
from relay.service import posterproc
from relay.store import outbox
from relay.store.db import StoreError
from relay.store.engine import Store
from relay.store.spool import Spool
from relay.store.webhooks import Subscriptions
from relay.webhook import EVENT_TYPES

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
        self.poster_command: Sequence[str] | None = None  # set: post from a child process
        self.process: PosterProcess | None = None
        self._starting: asyncio.Task[None] | None = None

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
        if self.process is not None:
            if self.subscriptions.endpoints:
                self.process.start()  # once there is something to post (idempotent)
            self.process.send_endpoints()
        for poster in self.posters:
            poster.wake()

    def start(self, spools: list[Spool]) -> None:
        """A poster for each spool (the worker's own first), woken when events are written."""
        loop = asyncio.get_running_loop()
        self._refresher = loop.create_task(self._refresh_loop(), name="webhooks-refresh")
        if self.poster_command is not None:
            paths = [spool.db.path for spool in spools]
            self.process = PosterProcess(
                self.poster_command, self.cfg, self.subscriptions, paths, self._metrics
            )
            for spool in spools:
                spool.events_written = self.process.wake
            self._starting = loop.create_task(self._start_if_needed(spools))
            return
        for spool in spools:
            name = spool.db.path.stem
            poster = Poster(
                spool, self.subscriptions, self.cfg, name=name, clock=self._clock,
                metrics=self._metrics,
            )  # fmt: skip
            spool.events_written = poster.wake
            poster.start()
            self.posters.append(poster)

    async def _start_if_needed(self, spools: list[Spool]) -> None:
        """The poster process is started when there is something to post: an endpoint, or
        events left pending (a removed endpoint's are failed by it). Without webhooks, none."""
        if self.process is None or self.subscriptions.endpoints:
            if self.process is not None:
                self.process.start()
            return
        for spool in spools:
            try:
                pending, _oldest = await outbox.backlog(spool.db)
            except StoreError:
                pending = 1  # cannot tell: let the poster look
            if pending:
                self.process.start()
                return

    async def reload(self, cfg: Config) -> None:
        self.cfg = cfg
        if self.process is not None:
            self.process.configure(cfg)
        for poster in self.posters:
            poster.configure(cfg)
        await self.refresh()

    async def stop(self) -> None:
        """Stop the posters (what they were posting stays pending for the next start)."""
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        if self._starting is not None:
            await asyncio.gather(self._starting, return_exceptions=True)
        if self.process is not None:
            await self.process.stop()
            self.process = None
        for poster in self.posters:
            await poster.stop()
        self.posters = []

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(float(self.cfg.webhooks.refresh_interval))  # sleep-ok: a timer
            await self.refresh()


OUTCOMES = ("delivered", "retried", "failed")
STOP_GRACE = 5.0  # seconds past its own drain a stopping poster process is given, then killed


class PosterProcess:
    """The worker's poster process: started, told of endpoints, config and new events, its
    reports added to the worker's metrics, started again if it ends on its own (what it had in
    flight stays pending in the outbox: posted again), stopped with the worker."""

    def __init__(
        self,
        command: Sequence[str],
        cfg: Config,
        subscriptions: Subscriptions,
        spools: list[Path],
        metrics: Metrics | None,
    ) -> None:
        self.command = list(command)
        self.cfg = cfg
        self.spools = spools
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0  # processes started so far
        self._subs = subscriptions
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake_due = False

    def start(self) -> None:
        if self._task is None and not self._stopping:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="webhook-poster")

    def wake(self) -> None:
        """Events were written: one ``wake`` line per turn of the loop, however many batches."""
        if not self._wake_due:
            self._wake_due = True
            asyncio.get_running_loop().call_soon(self._send_wake)

    def _send_wake(self) -> None:
        self._wake_due = False
        self._send(b"wake\n")

    def send_endpoints(self) -> None:
        self._send(posterproc.encode_endpoints(self._subs.endpoints))

    def configure(self, cfg: Config) -> None:
        self.cfg = cfg
        self._send(b"config " + posterproc.encode_config(cfg).encode() + b"\n")

    def _send(self, line: bytes) -> None:
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return  # not running: it reads everything due when it starts
        proc.stdin.write(line)

    async def stop(self) -> None:
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None and proc.stdin is not None:
            proc.stdin.close()  # end of file: it stops by itself
            grace = min(10.0, float(self.cfg.limits.drain_timeout)) + STOP_GRACE
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                log.error("webhook poster did not stop within %.0f s: killed", grace)
                proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        await restart.keep_running(
            self._once, lambda: self._stopping, log, "webhook poster", "pending events wait"
        )

    async def _once(self) -> int:
        proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=posterproc.LINE_LIMIT,
        )
        self.proc = proc
        self.started += 1
        log.info("webhook poster started pid=%d spools=%d", proc.pid, len(self.spools))
        init = {
            "config": posterproc.encode_config_data(self.cfg),
            "spools": [str(p) for p in self.spools],
        }
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"init " + posterproc.json_line(init))
        if self._subs.loaded:
            self.send_endpoints()
        try:
            while line := await proc.stdout.readline():
                self._report(line)
        except ValueError as exc:  # a line past the limit: not the child we started
            log.error("webhook poster: unreadable report (%s): stopping it", exc)
            proc.kill()
        return await proc.wait()

    def _report(self, line: bytes) -> None:
        kind, data = posterproc.parse(line)
        if self._metrics is None or not isinstance(data, list):
            return
        if kind == "events":
            for item in data:
                if (
                    isinstance(item, list) and len(item) == 3 and item[0] in EVENT_TYPES
                    and item[1] in OUTCOMES and isinstance(item[2], int)
                ):  # fmt: skip
                    self._metrics.webhook_event(item[0], item[1], item[2])
        elif kind == "backlog" and len(data) == 3 and isinstance(data[0], str):
            name = Path(data[0]).name
            if name in {p.stem for p in self.spools}:
                self._metrics.set_webhook_backlog(name, int(data[1]), float(data[2]))
