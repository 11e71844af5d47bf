"""Outbound delivery: take due recipients from the spool, hand them on, record what happened.

The deliverer schedules; relay/delivery/outbound.py speaks SMTP (routing by smarthost or MX, TLS
policy, connection reuse). One SMTP transaction per message per destination (recipient domain, or
the smarthost) with all its due recipients; concurrency is bounded in total and per destination.
Outcomes are per recipient: 2xx delivered; 4xx, timeouts and unreachable hosts deferred with backoff
until ``delivery.max_age``; 5xx bounced at once. Bounced recipients get one DSN
(relay/delivery/bounce.py), queued in the same transaction as the outcome.

A recipient the spool marks ``capture`` (a sandbox domain's, relay/store/sandbox.py) never reaches
relay/delivery/outbound.py, whatever ``delivery.mode`` says: its job goes to the sandbox inbox
(relay/store/inbox.py), and the outcome is "delivered" with relay ``inbox``. A DSN about a sandbox
message is a sandbox message too: captured, like everything its sender's domain sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import dns.asyncresolver

from relay import clock as clock_mod
from relay import grammar, maillog, replies, webhook
from relay.clock import Clock
from relay.config import Config
from relay.delivery import bounce
from relay.delivery.budget import BodyBudget
from relay.delivery.outbound import Outbound, Result
from relay.metrics import Metrics
from relay.store.db import StoreError
from relay.store.inbox import Inbox
from relay.store.outbox import EventRow
from relay.store.spool import DueRecipient, Message, Outcome, Spool
from relay.store.suppressions import Suppress
from relay.store.usage import Tally
from relay.store.webhooks import Subscriptions

log = logging.getLogger("relaybox.delivery")

BACKOFF = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)  # then every 4h
IDLE_POLL = 5.0  # an idle deliverer still looks this often (a `queue retry` from the CLI)
PURGE_INTERVAL = 3600.0
DEPTH_INTERVAL = 15.0  # how often the queue-depth gauge is refreshed (with metrics)
INBOX = "(sandbox inbox)"  # the destination of captured recipients: no domain is spelt so
INBOX_RELAY = "inbox"  # what the spool, the mail log and `queue show` record as their relay


def retry_at(attempts: int, created_at: float, now: float, max_age: float) -> float | None:
    """When to try again after ``attempts`` failed tries, or None once max_age has passed."""
    deadline = created_at + max_age
    if now >= deadline:
        return None
    return min(now + BACKOFF[min(attempts, len(BACKOFF)) - 1], deadline)


@dataclass
class _Job:
    key: str  # destination: the recipient domain, or "smarthost"
    message_id: str
    recipients: list[DueRecipient]
    started: bool = False


@dataclass
class _Limit:
    sem: asyncio.Semaphore
    users: int = 0


class Deliverer:
    """The delivery loop of one worker: claims due work, runs bounded jobs, records outcomes."""

    def __init__(
        self,
        spool: Spool,
        cfg: Config,
        *,
        clock: Clock = clock_mod.system,
        resolver: dns.asyncresolver.Resolver | None = None,
        metrics: Metrics | None = None,
        inbox: Inbox | None = None,
        tally: Tally | None = None,
        suppress: Suppress | None = None,
        subscriptions: Subscriptions | None = None,
    ) -> None:
        """``metrics`` (optional) gets per-recipient outcomes, latency and the queue depth;
        ``tally`` (optional) the outcomes per sending user, for its usage (relay/store/usage.py);
        ``suppress`` (optional) each bounce whose reply suppresses (``[suppression] codes``),
        for the sender's domain (relay/store/suppressions.py), once the outcome is recorded;
        ``subscriptions`` (optional) the webhook endpoints: each outcome one of them wants is
        written with it (relay/store/outbox.py).
        ``inbox``: where captured recipients go; without one, ``cfg``'s is opened when the first
        is due (and closed by :meth:`stop`)."""
        self.spool = spool
        self.cfg = cfg
        self._clock = clock
        self._out = Outbound(cfg, resolver)
        self._metrics = metrics
        self._tally = tally
        self._suppress = suppress
        self._subs = subscriptions
        d = cfg.delivery
        self._total = asyncio.Semaphore(d.concurrency)
        self.bodies = BodyBudget(int(d.memory_budget) // cfg.workers)  # large ones in flight
        self._limits: dict[str, _Limit] = {}
        self._max_pending = 2 * d.concurrency  # claimed jobs (running + waiting for a slot)
        self._jobs: dict[asyncio.Task[None], _Job] = {}
        self._inflight: set[tuple[str, int]] = set()  # claimed, outcome not yet recorded
        self._orphans = False  # a job ended with some of its recipients still in flight
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._main: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_purge = 0.0
        self._next_depth = 0.0
        self._inbox = inbox
        self._own_inbox = inbox is None
        self._inbox_lock = asyncio.Lock()

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or, after stop(), restart: a reload that lifts ``delivery.paused``)."""
        if self._main is not None and not self._main.done():
            return
        self._stopping = False
        self._out.closing = False
        self._next_depth = 0.0
        self._main = asyncio.get_running_loop().create_task(self._run(), name="delivery")

    def wake(self) -> None:
        """New mail was queued (or the clock moved): look for due work now."""
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 (a deadline, not an I/O timeout)
        """Until nothing is due and no job runs (tests, and `serve` benchmarks)."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    async def stop(self, timeout: float = 10) -> None:  # noqa: ASYNC109 (the drain window)
        """Stop claiming; let started transactions finish within ``timeout``; hand back the rest."""
        self._stopping = True
        self._out.closing = True
        self._wake.set()
        if self._main is not None:
            await self._main
        for task, job in list(self._jobs.items()):
            if not job.started:
                task.cancel()
        if self._jobs:
            _done, pending = await asyncio.wait(list(self._jobs), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._inflight:
            with contextlib.suppress(StoreError):
                await self.spool.release(sorted(self._inflight))
            self._inflight.clear()
        await self._out.close_idle(everything=True)
        if self._own_inbox and self._inbox is not None:
            inbox, self._inbox = self._inbox, None
            await inbox.close()

    # --- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        await self._out.start()
        batch = max(1, self._max_pending // 4)
        while not self._stopping:
            self._wake.clear()
            timeout = IDLE_POLL
            try:
                await self._maintain()
                room = self._max_pending - len(self._jobs)
                # Under load, claim a batch at a time rather than once per finished job.
                if room > 0 and (not self._jobs or room >= batch):
                    claimed = await self.spool.claim_due(room)
                    self._dispatch(claimed)
                    if len(claimed) >= room:
                        continue  # there may be more due right now
                    nxt = await self.spool.next_due()
                    if nxt is not None:
                        timeout = min(IDLE_POLL, max(0.0, nxt - self._clock()))
                    if not self._jobs and not self._wake.is_set():
                        self._idle.set()
            except StoreError as exc:
                log.error("delivery: spool unavailable: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _maintain(self) -> None:
        await self._out.close_idle()
        # Claimed recipients whose outcome could not be written (store fault): hand them back.
        if self._orphans:
            active = {(r.message_id, r.idx) for job in self._jobs.values() for r in job.recipients}
            orphans = self._inflight - active
            if orphans:
                await self.spool.release(sorted(orphans))
                self._inflight -= orphans
            self._orphans = False
        if self._metrics is not None and time.monotonic() >= self._next_depth:
            self._next_depth = time.monotonic() + DEPTH_INTERVAL
            self._metrics.set_queue_depth(await self.spool.depth())
        now = self._clock()
        if now >= self._next_purge:
            self._next_purge = now + PURGE_INTERVAL
            n = await self.spool.purge(now=now, retention=self.cfg.spool.retention)
            if n:
                log.info("spool purge: %d message(s) past retention removed", n)

    def _dispatch(self, claimed: Iterable[DueRecipient]) -> None:
        jobs: dict[tuple[str, str], _Job] = {}
        smarthost = self.cfg.delivery.mode == "smarthost"
        for r in claimed:
            self._inflight.add((r.message_id, r.idx))
            key = INBOX if r.capture else "smarthost" if smarthost else r.domain
            jobs.setdefault((r.message_id, key), _Job(key, r.message_id, [])).recipients.append(r)
        loop = asyncio.get_running_loop()
        for job in jobs.values():
            task = loop.create_task(self._job(job), name=f"deliver-{job.message_id}")
            self._jobs[task] = job
            task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        job = self._jobs.pop(task, None)
        if job is not None and any((r.message_id, r.idx) in self._inflight for r in job.recipients):
            self._orphans = True  # ended with recipients unrecorded: _maintain hands them back
        self._wake.set()  # room for more
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery job failed", exc_info=task.exception())

    async def _job(self, job: _Job) -> None:
        limit = self._limits.setdefault(
            job.key, _Limit(asyncio.Semaphore(self.cfg.delivery.per_destination))
        )
        limit.users += 1
        try:
            async with self.bodies.held(job.recipients[0].size), self._total, limit.sem:
                job.started = True
                msg = await self.spool.load(job.message_id)
                if msg is None or msg.body is None:  # deleted by `queue delete` meanwhile
                    self._inflight.difference_update((r.message_id, r.idx) for r in job.recipients)
                    return
                try:
                    addresses = [r.address for r in job.recipients]
                    if job.key == INBOX:
                        results = await self._capture(msg, msg.body, addresses)
                    else:
                        results = await self._out.deliver(job.key, msg.sender, msg.body, addresses)
                except Exception:  # a bug must not leave recipients claimed until a restart
                    log.exception("delivery of %s failed unexpectedly", job.message_id)
                    results = [Result("temp", str(replies.DELIVERY_INTERNAL_ERROR))] * len(
                        job.recipients
                    )
            await self._record(job, msg, results)
        finally:
            limit.users -= 1
            if limit.users == 0:
                self._limits.pop(job.key, None)

    async def _capture(self, msg: Message, body: bytes, addresses: list[str]) -> list[Result]:
        """Into the sandbox inbox: "delivered" once committed there; a store fault defers."""
        try:
            async with self._inbox_lock:
                if self._inbox is None:
                    self._inbox = await Inbox.open(self.cfg)
                inbox = self._inbox
            inbox_id = await inbox.capture(
                queue_id=msg.id,
                domain=msg.sandbox or "",
                sender=msg.sender,
                recipients=addresses,
                body=body,
                now=self._clock(),
            )
        except StoreError as exc:
            log.error("sandbox inbox: cannot capture %s: %s", msg.id, exc)
            return [Result("temp", str(replies.INBOX_UNAVAILABLE), INBOX_RELAY)] * len(addresses)
        if self._metrics is not None:
            self._metrics.captured(len(addresses))
        ok = Result("ok", str(replies.CAPTURED.fill(id=str(inbox_id))), INBOX_RELAY)
        return [ok] * len(addresses)

    # --- outcomes --------------------------------------------------------------------------------

    async def _record(self, job: _Job, msg: Message, results: list[Result]) -> None:
        now = self._clock()
        max_age = float(self.cfg.delivery.max_age)
        outcomes: list[Outcome] = []
        failures: list[bounce.Failure] = []
        for r, res in zip(job.recipients, results, strict=True):
            if res.kind == "ok":
                outcomes.append(
                    Outcome(r.message_id, r.idx, "delivered", res.code, res.reply, res.relay)
                )
                continue
            nxt = (
                retry_at(r.attempts + 1, msg.created_at, now, max_age)
                if res.kind == "temp"
                else None
            )
            if nxt is not None:
                outcomes.append(
                    Outcome(r.message_id, r.idx, "deferred", res.code, res.reply, res.relay, nxt)
                )
            else:
                outcomes.append(
                    Outcome(r.message_id, r.idx, "bounced", res.code, res.reply, res.relay)
                )
                failures.append(
                    bounce.Failure(r.address, res.reply, res.relay, res.kind == "temp", now)
                )
        dsn = bounce.for_failures(self.cfg, msg, failures, now=now)
        if dsn is not None and msg.sandbox is not None:
            dsn = dataclasses.replace(dsn, sandbox=msg.sandbox)  # to the sandbox sender: captured
        try:
            events = self._events(msg, job.recipients, outcomes, now)
            dsn_id = await self.spool.record(outcomes, bounce=dsn, events=events)
        except StoreError as exc:
            # They stay claimed in the file: released at stop, due again at the next start.
            log.error("could not record delivery outcomes of %s: %s", msg.id, exc)
            return
        self._inflight.difference_update((r.message_id, r.idx) for r in job.recipients)
        self._log(msg, job.recipients, outcomes, now)
        if dsn_id is not None:
            maillog.bounce_queued(msg.id, dsn_id, msg.sender, len(failures))
            self.wake()
        elif failures:
            maillog.bounce_dropped(msg.id, len(failures))
        if failures and msg.sender and self._suppress is not None:
            codes = self.cfg.suppression.codes
            await bounce.suppress(self._suppress, codes, msg, job.recipients, outcomes, now)

    def _events(
        self, msg: Message, rcpts: list[DueRecipient], outcomes: list[Outcome], now: float
    ) -> list[EventRow]:
        """message.delivered/deferred/bounced per recipient, for the endpoints that want them
        (none: nothing is built). A DSN (no user) is relaybox's own: no event."""
        if self._subs is None or not self._subs.endpoints or msg.user is None:
            return []
        mid = webhook.message_id_of(msg.body) if msg.body is not None else None
        domain = grammar.domain_part(msg.user)
        rows: list[EventRow] = []
        for r, o in zip(rcpts, outcomes, strict=True):
            data = webhook.message_data(
                queue_id=msg.id, message_id=mid, user=msg.user, sender=msg.sender,
                recipient=r.address, attempt=r.attempts + 1, remote_host=o.relay, reply=o.reply,
            )  # fmt: skip
            rows += self._subs.rows(f"message.{o.state}", domain, data, now)
        return rows

    def _log(
        self, msg: Message, rcpts: list[DueRecipient], outcomes: list[Outcome], now: float
    ) -> None:
        delay = now - msg.created_at
        m = self._metrics
        for r, o in zip(rcpts, outcomes, strict=True):
            n = r.attempts + 1
            if self._tally is not None:
                self._tally.add(msg.user, o.state, now)
            if o.state == "delivered":
                maillog.delivered(msg.id, r.address, o.relay, delay, n)
                if m is not None:
                    m.delivered(delay)
            elif o.state == "deferred":
                retry_in = (o.next_attempt_at or now) - now
                maillog.deferred(msg.id, r.address, o.relay, delay, n, o.reply, retry_in)
                if m is not None:
                    m.deferred()
            else:
                maillog.bounced(msg.id, r.address, o.relay, delay, n, o.reply)
                if m is not None:
                    m.bounced()
