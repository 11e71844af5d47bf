"""Outbound delivery: take due recipients from the spool, hand them on with aiosmtplib, record.

Routing (``delivery.mode``): ``smarthost`` sends everything to one relay (implicit TLS, STARTTLS or
plain, optional AUTH; its certificate is verified); ``mx`` looks up each recipient domain's MX via
relay/dnscheck.py (RFC 5321 5.1: lowest preference first, equal ones shuffled, the domain itself
when it has no MX; RFC 7505 null MX bounces at once) and connects to ``delivery.port``, using
STARTTLS when offered (``delivery.tls = opportunistic``), insisting on it (``required``) or not
(``none``). Opportunistic TLS to an MX is unauthenticated, as RFC 7435 describes: no MTA-STS/DANE.

One SMTP transaction per message per destination (domain, or the smarthost) with all its due
recipients; an idle connection to a destination is kept a few seconds and reused by the next message
for it. Concurrency is bounded in total and per destination. Outcomes are per recipient: 2xx
delivered; 4xx, timeouts and unreachable hosts deferred with backoff until ``delivery.max_age``;
5xx bounced at once. Bounced recipients get one DSN (relay/bounce.py), queued atomically with the
outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import dns.asyncresolver

from relay import bounce, dnscheck, maillog
from relay import clock as clock_mod
from relay.clock import Clock
from relay.config import Config
from relay.db import StoreError
from relay.spool import DueRecipient, Message, Outcome, Spool

log = logging.getLogger("relaybox.delivery")

BACKOFF = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)  # then every 4h
IDLE_POLL = 5.0  # an idle deliverer still looks this often (a `queue retry` from the CLI)
CONN_KEEP = 5.0  # seconds an idle outbound connection is kept for the next message
MAX_ADDRESSES = 6  # MX addresses tried per attempt before deferring
PURGE_INTERVAL = 3600.0


@dataclass(frozen=True)
class Result:
    """What happened to one recipient in one attempt."""

    kind: str  # "ok" | "temp" | "perm"
    reply: str  # "250 2.0.0 OK ..." as received, or our own reason
    relay: str = ""  # "host[ip]" or ""

    @property
    def code(self) -> int | None:
        head = self.reply[:3]
        return int(head) if head.isdigit() else None


def classify(code: int, text: str, relay: str = "") -> Result:
    reply = f"{code} {' '.join(text.split())}"
    if 200 <= code < 300:
        return Result("ok", reply, relay)
    return Result("perm" if 500 <= code < 600 else "temp", reply, relay)


def retry_at(attempts: int, created_at: float, now: float, max_age: float) -> float | None:
    """When to try again after ``attempts`` failed tries, or None once max_age has passed."""
    deadline = created_at + max_age
    if now >= deadline:
        return None
    return min(now + BACKOFF[min(attempts, len(BACKOFF)) - 1], deadline)


class _Unreachable(Exception):
    """No transaction could start (connect, greeting, TLS, EHLO, AUTH): defer the whole job."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.reply)
        self.result = result


@dataclass
class _Conn:
    smtp: aiosmtplib.SMTP
    relay: str
    idle_since: float = 0.0


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


@dataclass
class _Pool:
    idle: dict[str, list[_Conn]] = field(default_factory=dict)

    def take(self, key: str) -> _Conn | None:
        conns = self.idle.get(key, [])
        while conns:
            conn = conns.pop()
            if conn.smtp.is_connected and time.monotonic() - conn.idle_since < CONN_KEEP:
                return conn
            conn.smtp.close()
        return None

    def give(self, key: str, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        self.idle.setdefault(key, []).append(conn)

    def expired(self, everything: bool = False) -> list[_Conn]:
        now = time.monotonic()
        out: list[_Conn] = []
        for key in list(self.idle):
            keep = [c for c in self.idle[key] if not everything and now - c.idle_since < CONN_KEEP]
            out += [c for c in self.idle[key] if c not in keep]
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]
        return out


class Deliverer:
    """The delivery loop of one worker: claims due work, runs bounded jobs, records outcomes."""

    def __init__(
        self,
        spool: Spool,
        cfg: Config,
        *,
        clock: Clock = clock_mod.system,
        resolver: dns.asyncresolver.Resolver | None = None,
        metrics: Any = None,
    ) -> None:
        self.spool = spool
        self.cfg = cfg
        self._clock = clock
        self._resolver = resolver
        self._metrics = metrics
        d = cfg.delivery
        self._total = asyncio.Semaphore(d.concurrency)
        self._limits: dict[str, _Limit] = {}
        self._max_pending = 2 * d.concurrency  # claimed jobs (running + waiting for a slot)
        self._jobs: dict[asyncio.Task[None], _Job] = {}
        self._inflight: set[tuple[str, int]] = set()  # claimed, outcome not yet recorded
        self._pool = _Pool()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._main: asyncio.Task[None] | None = None
        self._stopping = False
        self._tls_verify: ssl.SSLContext | None = None
        self._tls_any: ssl.SSLContext | None = None
        self._next_purge = 0.0

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._main is None:
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
        await self._close(self._pool.expired(everything=True))

    # --- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        self._tls_verify, self._tls_any = await asyncio.to_thread(_contexts)
        while not self._stopping:
            self._wake.clear()
            timeout = IDLE_POLL
            try:
                await self._maintain()
                room = self._max_pending - len(self._jobs)
                if room > 0:
                    claimed = await self.spool.claim_due(room)
                    if claimed:
                        self._dispatch(claimed)
                        continue
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
        await self._close(self._pool.expired())
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
            key = "smarthost" if smarthost else r.domain
            jobs.setdefault((r.message_id, key), _Job(key, r.message_id, [])).recipients.append(r)
        loop = asyncio.get_running_loop()
        for job in jobs.values():
            task = loop.create_task(self._job(job), name=f"deliver-{job.message_id}")
            self._jobs[task] = job
            task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._jobs.pop(task, None)
        self._wake.set()  # room for more
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery job failed", exc_info=task.exception())

    async def _job(self, job: _Job) -> None:
        limit = self._limits.setdefault(job.key, _Limit(asyncio.Semaphore(self._per_dest())))
        limit.users += 1
        try:
            async with self._total, limit.sem:
                job.started = True
                msg = await self.spool.load(job.message_id)
                if msg is None or msg.body is None:  # deleted by `queue delete` meanwhile
                    self._inflight.difference_update((r.message_id, r.idx) for r in job.recipients)
                    return
                try:
                    results = await self._attempt(job, msg)
                except Exception:  # a bug must not leave recipients claimed until a restart
                    log.exception("delivery of %s failed unexpectedly", job.message_id)
                    results = [Result("temp", "451 4.3.0 internal error in delivery")] * len(
                        job.recipients
                    )
            await self._record(job, msg, results)
        finally:
            limit.users -= 1
            if limit.users == 0:
                self._limits.pop(job.key, None)

    def _per_dest(self) -> int:
        return self.cfg.delivery.per_destination

    # --- one attempt -----------------------------------------------------------------------------

    async def _attempt(self, job: _Job, msg: Message) -> list[Result]:
        rcpts = job.recipients
        conn = self._pool.take(job.key)
        for _try in range(2):  # a reused connection may have been closed by the server meanwhile
            if conn is None:
                try:
                    conn = await self._open(job)
                except _Unreachable as exc:
                    return [exc.result] * len(rcpts)
            try:
                results = await self._transaction(conn, msg, rcpts)
            except _Stale:
                conn.smtp.close()
                conn = None
                continue
            if conn.smtp.is_connected and not self._stopping:
                self._pool.give(job.key, conn)
            else:
                conn.smtp.close()
            return results
        return [Result("temp", "451 4.4.2 connection lost", "")] * len(rcpts)  # pragma: no cover

    async def _transaction(
        self, conn: _Conn, msg: Message, rcpts: list[DueRecipient]
    ) -> list[Result]:
        smtp, relay = conn.smtp, conn.relay
        utf8 = not (msg.sender.isascii() and all(r.address.isascii() for r in rcpts))
        options = []
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(msg.body or b'')}")  # RFC 1870
        if utf8 and smtp.supports_extension("smtputf8"):
            options.append("SMTPUTF8")  # RFC 6531
        if smtp.supports_extension("8bitmime") and not (msg.body or b"").isascii():
            options.append("BODY=8BITMIME")  # RFC 6152
        enc = "utf-8" if utf8 else "ascii"
        results: dict[int, Result] = {}
        accepted: list[DueRecipient] = []
        started = False
        try:
            try:
                await smtp.mail(msg.sender, options=options, encoding=enc)
            except aiosmtplib.SMTPSenderRefused as exc:
                await _rset(smtp)
                return [classify(exc.code, exc.message, relay)] * len(rcpts)
            started = True
            for r in rcpts:
                try:
                    await smtp.rcpt(r.address, encoding=enc)
                    accepted.append(r)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    results[r.idx] = classify(exc.code, exc.message, relay)
            if accepted:
                try:
                    resp = await smtp.data(msg.body or b"")
                    ok = classify(resp.code, resp.message, relay)
                except aiosmtplib.SMTPDataError as exc:
                    ok = classify(exc.code, exc.message, relay)
                    await _rset(smtp)
                for r in accepted:
                    results[r.idx] = ok
            else:
                await _rset(smtp)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            if not started and conn.idle_since:
                raise _Stale from exc
            smtp.close()
            fail = Result("temp", f"451 4.4.2 connection lost ({exc})", relay)
        except (aiosmtplib.SMTPException, TimeoutError, OSError) as exc:
            smtp.close()
            fail = Result("temp", f"451 4.4.2 {_reason(exc)}", relay)
        else:
            return [results[r.idx] for r in rcpts]
        return [results.get(r.idx, fail) for r in rcpts]

    # --- connections -----------------------------------------------------------------------------

    async def _open(self, job: _Job) -> _Conn:
        d = self.cfg.delivery
        if job.key != "smarthost":
            return await self._open_mx(job.key)
        sh = d.smarthost
        # A configured relay (maybe with our password) is authenticated: its certificate is
        # verified. Even a 5xx while connecting (bad credentials, refused greeting) is our set-up,
        # not the mail's fault: it defers, so the mail survives a fix of the config.
        starttls = "must" if sh.security == "starttls" else "no"
        return await self._dial(
            sh.host, sh.port, sh.host, use_tls=sh.security == "tls", starttls=starttls, verify=True
        )

    async def _open_mx(self, domain: str) -> _Conn:
        if not domain:
            raise _Unreachable(Result("perm", "550 5.1.3 recipient address has no domain"))
        if self._resolver is None:
            self._resolver = dnscheck.make_resolver(self.cfg)
        mx = await dnscheck.resolve_mx(self._resolver, domain)
        if mx.null_mx:  # RFC 7505 3.2 / 4.2
            raise _Unreachable(Result("perm", f"556 5.1.10 {domain} accepts no mail (null MX)"))
        if mx.temperror:
            raise _Unreachable(Result("temp", f"451 4.4.3 DNS lookup for {domain}: {mx.reason}"))
        if not mx.hosts:
            raise _Unreachable(Result("perm", f"550 5.1.2 cannot route to {domain}: {mx.reason}"))
        last = Result("temp", f"451 4.4.3 no address for the MX hosts of {domain}")
        tried = 0
        for host in mx.hosts:
            addrs = await dnscheck.lookup_addresses(self._resolver, host)
            for ip in addrs.addresses:
                if tried >= MAX_ADDRESSES:
                    raise _Unreachable(last)
                tried += 1
                try:
                    return await self._connect_mx(host, ip)
                except _Unreachable as exc:  # RFC 5321 5.1: try the next address, the next MX
                    last = exc.result
        raise _Unreachable(last)

    async def _connect_mx(self, host: str, ip: str) -> _Conn:
        mode = self.cfg.delivery.tls
        port = self.cfg.delivery.port
        if mode != "none":
            starttls = "must" if mode == "required" else "try"
            try:
                return await self._dial(ip, port, host, starttls=starttls)
            except _TLSFailed as exc:
                if mode == "required":
                    reply = f"451 4.7.5 STARTTLS with {host} failed: {exc}"
                    raise _Unreachable(Result("temp", reply, f"{host}[{ip}]")) from None
                # Opportunistic (RFC 7435): a broken TLS stack must not stop the mail.
                log.info("STARTTLS with %s[%s] failed (%s), retrying without", host, ip, exc)
        return await self._dial(ip, port, host, starttls="no")

    async def _dial(
        self,
        addr: str,
        port: int,
        name: str,
        *,
        starttls: str,  # "no" | "try" | "must"
        use_tls: bool = False,
        verify: bool = False,
    ) -> _Conn:
        d = self.cfg.delivery
        smtp = aiosmtplib.SMTP(
            hostname=addr,
            port=port,
            local_hostname=self.cfg.public_hostname,
            timeout=float(d.command_timeout),
            use_tls=use_tls,
            start_tls=False,
            tls_context=self._tls_verify if verify else self._tls_any,
        )
        relay = name
        try:
            await smtp.connect(timeout=float(d.connect_timeout))
            relay = f"{name}[{_peer(smtp)}]"
            await _hello(smtp)
            if starttls != "no" and smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(server_hostname=name)
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    smtp.close()
                    raise _TLSFailed(_reason(exc)) from None
                await _hello(smtp)
            elif starttls == "must":
                reply = f"451 4.7.4 {name} does not offer STARTTLS, which is required"
                raise _Unreachable(Result("temp", reply, relay))
            if verify and d.smarthost.username:
                await smtp.login(d.smarthost.username, d.smarthost.password)
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise _Unreachable(Result("temp", _one(exc.code, exc.message), relay)) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            raise _Unreachable(Result("temp", f"451 4.4.1 {_reason(exc)}", relay)) from None
        except _Unreachable:
            smtp.close()
            raise
        return _Conn(smtp, relay)

    async def _close(self, conns: list[_Conn]) -> None:
        """QUIT politely (RFC 5321 4.1.1.10), briefly; then drop."""

        async def quit_one(conn: _Conn) -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await conn.smtp.quit()
            conn.smtp.close()

        if conns:
            await asyncio.gather(*(quit_one(c) for c in conns))

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
        try:
            dsn_id = await self.spool.record(outcomes, bounce=dsn)
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

    def _log(
        self, msg: Message, rcpts: list[DueRecipient], outcomes: list[Outcome], now: float
    ) -> None:
        delay = now - msg.created_at
        m = self._metrics
        for r, o in zip(rcpts, outcomes, strict=True):
            n = r.attempts + 1
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


class _Stale(Exception):
    """A pooled connection turned out closed before the transaction began: dial afresh."""


class _TLSFailed(Exception):
    """STARTTLS was offered but failed."""


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(verifying context for the smarthost, context for opportunistic TLS to MX hosts)."""
    verify = ssl.create_default_context()
    anything = ssl.create_default_context()
    anything.check_hostname = False
    anything.verify_mode = ssl.CERT_NONE
    return verify, anything


async def _hello(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        await smtp.helo()  # RFC 5321 3.2: a server that does not know EHLO


async def _rset(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        smtp.close()


def _peer(smtp: aiosmtplib.SMTP) -> str:
    with contextlib.suppress(aiosmtplib.SMTPException):
        peer = smtp.get_transport_info("peername")
        if peer:
            return str(peer[0])
    return "?"


def _one(code: int, text: str) -> str:
    return f"{code} {' '.join(str(text).split())}"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
