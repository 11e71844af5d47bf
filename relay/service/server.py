"""The service: listeners, lifecycle, signals, and the periodic jobs.

The lifecycle reads like a script (uvicorn's shape): :meth:`Server.startup` opens the store, binds
every listener and starts delivery; :meth:`Server.run` waits for a stop; :meth:`Server.shutdown`
stops accepting, lets sessions finish within ``limits.drain_timeout``, cuts what is left, then
stops delivery and closes the store. Signal handlers only set flags or schedule work.

aiosmtpd's ``SMTP`` is served on this loop (not ``Controller``, which runs a second loop in a
thread), from relaybox's own accept loop (relay/service/listen.py): every connection is counted
from accept, its TLS handshake included, and running out of file descriptors pauses accepting
with one log line per interval instead of a traceback per try.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver

from relay import clock as clock_mod
from relay import config as config_mod
from relay import dnscheck
from relay.clock import Clock
from relay.config import Config, Listener
from relay.delivery.scheduler import Deliverer
from relay.loglimit import LogLimit
from relay.metrics import Metrics
from relay.service import gctune, listen, sdnotify, tlsutil
from relay.service.webhooks import Webhooks
from relay.signproc import KeyProcess
from relay.smtp.accept import Acceptor
from relay.smtp.auth import Authenticator
from relay.smtp.controls import Quota
from relay.smtp.gate import Gate
from relay.smtp.handler import Handler
from relay.smtp.session import RelaySMTP
from relay.store import domains, leases, shared, suppressions
from relay.store.db import StoreError
from relay.store.engine import Store
from relay.store.passwords import Hasher
from relay.store.spool import Spool
from relay.store.usage import Tally

log = logging.getLogger("relaybox.server")

LOGIN_FLUSH_INTERVAL = 30.0
STOP_MARGIN = 15.0  # seconds a stop needs after the drain: delivery, flushes, closing the store


@dataclass(frozen=True)
class Bound:
    listener: Listener
    address: str
    port: int


class Server:
    def __init__(self, cfg: Config, *, clock: Clock = clock_mod.system, worker: int = 0) -> None:
        self.cfg = cfg
        self.clock = clock
        self.worker = worker
        self.metrics = Metrics()
        self.gate = Gate(cfg.limits, self.metrics, workers=cfg.workers, spill_dir=cfg.state_dir)
        self._shutting_down = False
        self.bound: list[Bound] = []
        self._listening: list[listen.Listening] = []
        self._stop = asyncio.Event()
        self._serving = False  # startup done: a SIGHUP before it is held (_reload_pending)
        self._reload_pending = False
        self._tasks: list[asyncio.Task[None]] = []
        self._ssl: tlsutil.LiveContext | None = None  # one for good: a reload swaps its certificate
        # Made by startup(), in this order; None until then (and after a failed start).
        self.db: Store | None = None
        self.usage_db: Store | None = None  # usage.db: the per-user counts
        self.tally = Tally()  # delivery outcomes per user, flushed into the usage periodically
        self._hasher: Hasher | None = None
        self._auth: Authenticator | None = None
        self.resolver: dns.asyncresolver.Resolver | None = None
        self.spool: Spool | None = None
        self.deliverer: Deliverer | None = None
        self._orphans: list[tuple[Spool, Deliverer]] = []
        self.webhooks = Webhooks(cfg, clock=clock, metrics=self.metrics)
        self.keys = KeyProcess()
        self.acceptor: Acceptor | None = None
        self.handler: Handler | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def startup(self, *, after_bind: Callable[[], None] | None = None) -> None:
        """Bind, then (``after_bind``: e.g. drop root) open the store, then start serving.

        Listeners are bound first and serve only once the store is open, so a root start can
        bind 465/587 and hand everything after it to the service user. A configured certificate
        is read before ``after_bind`` (root can read /etc/letsencrypt); a generated one after it,
        so it belongs to the service user.
        """
        cfg = self.cfg
        self._ssl = tlsutil.new_context(cfg)
        if cfg.tls.cert:
            tlsutil.reload(self._ssl, cfg)
        shortage_log = LogLimit(1, listen.LOG_INTERVAL)  # one for every listener
        for listener in cfg.listen:
            # Plain TCP on both kinds: an implicit-TLS session does its own handshake, so it is
            # counted (and bounded by limits.tls_handshake_timeout) from accept.
            sockets = await listen.bind(
                listener.address, listener.port, reuse_port=cfg.workers > 1, backlog=1024
            )
            factory = functools.partial(self._protocol, listener)
            trusted = listener.trusted_proxies if listener.proxy_protocol else ()
            self._listening.append(
                listen.Listening(
                    sockets, factory, shortage_log=shortage_log, trusted_proxies=trusted
                )
            )
        if after_bind is not None:
            after_bind()
        if not cfg.tls.cert:
            tlsutil.ensure_self_signed(cfg)
            tlsutil.reload(self._ssl, cfg)
        self.db = await shared.open_main(cfg)
        # The counts every worker (and node) shares: sending limits, AUTH failures.
        self.usage_db = await shared.open_counts(cfg)
        self._hasher = Hasher(cfg.auth)
        self._auth = Authenticator(
            self.db, self._hasher, cfg, clock=self.clock, shared=self.usage_db
        )
        self.resolver = dnscheck.make_resolver(cfg)
        self.spool = await Spool.open(cfg, worker=self.worker, clock=self.clock)
        self._suppress = suppressions.recorder(self.db, lambda: self.cfg, self.metrics)
        await self.webhooks.open(self.db)
        self.deliverer = self._deliverer(self.spool)
        self.acceptor = Acceptor(
            self.db, self.spool, self.metrics, wake=self.deliverer.wake,
            subscriptions=self.webhooks.subscriptions, key_process=self.keys,
        )  # fmt: skip
        self.keys.configure(cfg.dkim_signing, cfg.workers)
        self.quota = Quota(self.usage_db, cfg, self.metrics, self.clock)
        self.handler = Handler(cfg, self._auth, self.acceptor, self.metrics, self.quota)
        if self.worker == 0:
            await self._adopt_orphan_spools(self.resolver)
        self.webhooks.start([self.spool, *(s for s, _d in self._orphans)])
        if not cfg.delivery.paused:
            self.deliverer.start()
            for _spool, deliverer in self._orphans:
                deliverer.start()
        self._tasks.append(asyncio.create_task(self._periodic(), name="relaybox-periodic"))
        if self.worker == 0:  # once per service, not once per worker
            if cfg.metrics.listen:
                await self.metrics.start_http(cfg.metrics.listen)
            self._tasks.append(asyncio.create_task(self._recheck_loop(), name="relaybox-recheck"))
        for listening, listener in zip(self._listening, cfg.listen, strict=True):
            listening.start()
            for sock in listening.sockets:
                addr = sock.getsockname()
                bound = Bound(listener, str(addr[0]), int(addr[1]))
                self.bound.append(bound)
                log.info(
                    "listening address=%s port=%d mode=%s worker=%d",
                    bound.address, bound.port, listener.mode, self.worker,
                )  # fmt: skip

    def _protocol(self, listener: Listener, client: tuple[str, int] | None) -> RelaySMTP:
        """A session; ``client``: the address a PROXY header named (None: the socket's peer)."""
        cfg = self.cfg
        tls = listener.mode == "tls"
        return RelaySMTP(
            self.gate,
            self.handler,
            listener.mode,
            client=client,
            hostname=cfg.public_hostname,
            ident="ESMTP relaybox",
            data_size_limit=int(cfg.limits.max_message_size),
            tls_context=None if tls else self._ssl,
            implicit_tls=self._ssl if tls else None,
            # RFC 3207 / RFC 4954 4: before STARTTLS, AUTH gets 538 5.7.11 and MAIL gets 530 5.7.0
            # (AUTH comes first), so no envelope travels in the clear. On the implicit-TLS
            # listener aiosmtpd cannot see the TLS (the session did it before aiosmtpd's part
            # began), so its TLS requirement must be off there, and only there.
            auth_require_tls=not tls and not cfg.auth.allow_plaintext,
            timeout=float(cfg.limits.idle_timeout),
            auth_exclude_mechanism=["CRAM-MD5"],
        )

    async def run(
        self,
        *,
        install_signals: bool = True,
        notify: bool = True,
        after_bind: Callable[[], None] | None = None,
        hangup_seen: Callable[[], bool] | None = None,
    ) -> None:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_stop`), then shut down.

        The signal handlers are in place before startup: a SIGHUP while starting (whose default
        action would end the process) is held and done once serving, as is one that
        ``hangup_seen`` says came before this loop ran (the CLI's latch).
        """
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        if install_signals:
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            await self.startup(after_bind=after_bind)
        except BaseException:
            if install_signals:
                for sig in signals:
                    loop.remove_signal_handler(sig)
            # Close what did open (aiosqlite threads would otherwise keep the process alive).
            await self.shutdown()
            raise
        self._serving = True
        if self._reload_pending or (hangup_seen is not None and hangup_seen()):
            self._reload_pending = False
            await self.reload(notify=False)  # before READY: systemd sees one start
        if notify:  # a service (`relaybox serve`), not a test's server in its own process
            gctune.settle()
            sdnotify.ready(f"listening on {len(self.bound)} sockets")
        try:
            await self._stop.wait()
        finally:
            if notify:
                sdnotify.stopping(f"draining {len(self.gate.sessions)} sessions")
                # The drain may outlast the unit's TimeoutStopSec: ask for what it needs.
                sdnotify.extend_timeout(float(self.cfg.limits.drain_timeout) + STOP_MARGIN)
            if install_signals:
                for sig in signals:
                    loop.remove_signal_handler(sig)
            await self.shutdown()

    def request_stop(self) -> None:
        log.info("stop requested: draining")
        self._stop.set()

    def request_reload(self) -> None:
        if not self._serving:
            self._reload_pending = True  # run() reloads once startup is done
            return
        asyncio.get_running_loop().create_task(self.reload())

    async def reload(self, cfg: Config | None = None, *, notify: bool = True) -> None:
        """SIGHUP: re-read the config file and swap in the TLS certificate (:attr:`tls_context`).

        Live: TLS files (checked first: a certificate or key that is missing, does not parse or
        does not match fails the whole reload, and nothing changes; a generated certificate is
        generated again first if public_hostname changed), auth limits and cache TTL,
        limits (new sessions), delivery pause, webhook endpoints (read again), ``[webhooks]``,
        ``dkim_signing``. Delivery settings other than the pause are read when the deliverer is
        (re)started. Listeners, state_dir and databases need a restart (logged if they changed).
        """
        if notify:
            sdnotify.reloading()
        try:
            new = cfg or config_mod.load(
                None if self.cfg.source.startswith("(") else self.cfg.source
            )
            if new.listen != self.cfg.listen or new.state_dir != self.cfg.state_dir:
                log.warning("reload: listeners and state_dir change only on restart")
            tlsutil.ensure_self_signed(new)  # a generated certificate follows public_hostname
            tlsutil.reload(self.tls_context, new)
            was_paused = self.cfg.delivery.paused
            self.cfg = new
            if was_paused != new.delivery.paused:
                for deliverer in self._deliverers():
                    if new.delivery.paused:
                        await deliverer.stop()
                    else:
                        deliverer.start()
            if self._auth is not None:
                self._auth.configure(new)
            await self.webhooks.reload(new)
            if self.handler is not None:
                self.handler.configure(new)
                self.handler.quota.configure(new)
            self.gate.configure(new.limits, new.workers)
            self.keys.configure(new.dkim_signing, new.workers)
            log.info("reloaded config from %s and TLS certificate", new.source)
        except (config_mod.ConfigError, OSError, ssl.SSLError) as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            if notify:
                sdnotify.status("reload failed, running with the previous config (see the log)")
        finally:
            if notify:
                sdnotify.ready()

    async def shutdown(self) -> None:
        """Stop accepting, drain, cut what is left, stop delivery, close the store. Idempotent."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self.gate.draining = True
        for listening in self._listening:
            listening.close()
        # Idle sessions go at once; sessions mid-transaction may finish within the drain window.
        await self.gate.drain(float(self.cfg.limits.drain_timeout))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(self.webhooks.stop(), self.keys.stop())
        if self.deliverer is not None:
            await self.deliverer.stop()
        for spool, deliverer in self._orphans:
            await deliverer.stop()
            await spool.close()
        if self._auth is not None:
            await self._auth.flush_logins()
        if self.handler is not None:
            await self.handler.quota.close()
            adm = self.handler.quota.admissions
            log.info("admitted %d messages in %d transactions", adm.admitted, adm.batches)
        if self.usage_db is not None:
            with contextlib.suppress(StoreError):
                await self.tally.flush(self.usage_db, self.clock())
            await self.usage_db.close()
        await self.metrics.stop_http()
        if self.spool is not None:
            await self.spool.close()
        if self.db is not None:
            await self.db.close()
        if self._hasher is not None:
            self._hasher.close()
        log.info("stopped")

    def _deliverer(self, spool: Spool) -> Deliverer:
        return Deliverer(
            spool, self.cfg, clock=self.clock, resolver=self.resolver, metrics=self.metrics,
            tally=self.tally, suppress=self._suppress, subscriptions=self.webhooks.subscriptions,
        )  # fmt: skip

    def _deliverers(self) -> list[Deliverer]:
        own = [self.deliverer] if self.deliverer is not None else []
        return own + [d for _s, d in self._orphans]

    async def _adopt_orphan_spools(self, resolver: dns.asyncresolver.Resolver) -> None:
        """Deliver what spool files of workers that no longer exist still hold: after ``workers``
        is lowered, spool-I.db for I >= workers is worker 0's to deliver (never to queue into)."""
        for path in sorted(self.cfg.state_dir.glob("spool-*.db")):
            index = path.stem.removeprefix("spool-")
            if not index.isdigit() or int(index) < self.cfg.workers:
                continue
            spool = await Spool.open(self.cfg, worker=int(index), clock=self.clock)
            deliverer = self._deliverer(spool)
            self._orphans.append((spool, deliverer))
            log.info("delivering what %s still holds (workers = %d)", path.name, self.cfg.workers)

    @property
    def tls_context(self) -> tlsutil.LiveContext:
        """What every new TLS handshake uses, on both listeners (implicit TLS and STARTTLS): the
        same object for the server's life; a reload swaps the certificate it hands out."""
        assert self._ssl is not None
        return self._ssl

    @property
    def auth(self) -> Authenticator:
        assert self._auth is not None
        return self._auth

    # --- periodic jobs -----------------------------------------------------------------------

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(LOGIN_FLUSH_INTERVAL)  # sleep-ok: a timer
            try:
                await self.auth.flush_logins()
                self.auth.prune()
                await self.auth.prune_shared()
                if self.usage_db is not None:
                    await self.tally.flush(self.usage_db, self.clock())
            except StoreError as exc:
                log.warning("periodic flush failed: %s", exc)

    async def _recheck_loop(self) -> None:
        interval = float(self.cfg.dns.recheck_interval)
        while interval > 0:  # every node and worker has this timer: one of them re-checks for all
            await asyncio.sleep(interval)  # sleep-ok: a timer
            await self.recheck_domains(lease=interval)

    async def recheck_domains(self, lease: float = 0) -> None:
        assert self.db is not None and self.resolver is not None
        try:  # with a ``lease``, only if no node or worker did it within that many seconds
            if lease and not await leases.recheck_due(self.db, self.clock(), lease):
                return
            result = await domains.recheck(
                self.db, resolver=self.resolver, cfg=self.cfg, now=self.clock()
            )
            if self.acceptor is not None:
                self.acceptor.forget()
            self.metrics.set_domain_states(Counter(d.state for d in result))
        except StoreError as exc:
            log.warning("domain recheck failed: %s", exc)
