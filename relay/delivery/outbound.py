"""The SMTP client side of delivery: dial a destination, keep idle connections, run transactions.

Split out of relay/delivery.py (which schedules and records) to keep modules small; the two are the
only places that speak outbound SMTP. Routing (``delivery.mode``): ``smarthost`` sends everything
to one relay (implicit TLS, STARTTLS or plain, optional AUTH; its certificate is verified); ``mx``
looks up the recipient domain's MX via relay/dnslookup.py (RFC 5321 5.1: lowest preference first,
equal ones shuffled, the domain itself when it has no MX; RFC 7505 null MX is a permanent failure)
and connects to ``delivery.port``, using STARTTLS when offered (``delivery.tls = opportunistic``),
insisting on it (``required``) or not (``none``). Opportunistic TLS to an MX is unauthenticated,
as RFC 7435 describes (no MTA-STS or DANE).

An idle connection is kept ``CONN_KEEP`` seconds and reused for the next message to the same
destination; if the server closed it meanwhile, the transaction is retried once on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib
import dns.asyncresolver

from relay import dnslookup, maillog, replies
from relay.config import Config

log = logging.getLogger("relaybox.delivery")

CONN_KEEP = 5.0  # seconds an idle outbound connection is kept for the next message
MAX_ADDRESSES = 6  # MX addresses tried per attempt before deferring
REPLY_LIMIT = 1000  # characters of a reply kept (a multi-line reply is joined into one line)
RELAY_LIMIT = 300  # "host[ip]": a DNS name is at most 253 characters
REASON_LIMIT = 200  # characters of an error's text put into our own reasons


@dataclass(frozen=True)
class Result:
    """What happened to one recipient in one attempt.

    Made printable when made: a peer's reply (and every text built from what a peer or DNS said)
    enters the spool, the mail log, the DSN and `queue show` through here, so none of them ever
    holds a line break, a terminal escape or a bidi override from outside (each becomes '?').
    """

    kind: str  # "ok" | "temp" | "perm"
    reply: str  # "250 2.0.0 OK ..." as received (one line, printable ASCII), or our own reason
    relay: str = ""  # "host[ip]" or ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "reply", _clean(self.reply, REPLY_LIMIT))
        object.__setattr__(self, "relay", _clean(self.relay, RELAY_LIMIT))

    @property
    def code(self) -> int | None:
        head = self.reply[:3]
        return int(head) if head.isdigit() else None


def classify(code: int, text: str, relay: str = "") -> Result:
    reply = f"{code} {text}"
    if 200 <= code < 300:
        return Result("ok", reply, relay)
    return Result("perm" if 500 <= code < 600 else "temp", reply, relay)


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


class Outbound:
    """Outbound connections of one deliverer (callers bound concurrency per destination)."""

    def __init__(self, cfg: Config, resolver: dns.asyncresolver.Resolver | None = None) -> None:
        self.cfg = cfg
        self._resolver = resolver
        self._pool = _Pool()
        self._tls_verify: ssl.SSLContext | None = None
        self._tls_any: ssl.SSLContext | None = None
        self.closing = False  # no more pooling (shutdown)

    async def start(self) -> None:
        """Build the TLS contexts (loading the CA store takes a while: in a thread)."""
        self._tls_verify, self._tls_any = await asyncio.to_thread(_contexts)

    async def deliver(
        self, key: str, sender: str, body: bytes, rcpts: Sequence[str]
    ) -> list[Result]:
        """One transaction to destination ``key`` (a domain, or \"smarthost\"): a result per
        recipient, in order. Never raises for anything the network or the peer does."""
        conn = self._pool.take(key)
        for _try in range(2):  # a reused connection may have been closed by the server meanwhile
            if conn is None:
                try:
                    conn = await self._open(key)
                except _Unreachable as exc:
                    return [exc.result] * len(rcpts)
            try:
                results = await _transaction(conn, sender, body, rcpts)
            except _Stale:
                conn.smtp.close()
                conn = None
                continue
            if conn.smtp.is_connected and not self.closing:
                self._pool.give(key, conn)
            else:
                conn.smtp.close()
            return results
        return [Result("temp", str(replies.CONNECTION_LOST), "")] * len(rcpts)  # pragma: no cover

    # --- connections -----------------------------------------------------------------------------

    async def _open(self, key: str) -> _Conn:
        d = self.cfg.delivery
        if key != "smarthost":
            return await self._open_mx(key)
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
            raise _Unreachable(Result("perm", str(replies.NO_RECIPIENT_DOMAIN)))
        if self._resolver is None:
            self._resolver = dnslookup.make_resolver(self.cfg)
        mx = await dnslookup.resolve_mx(self._resolver, domain)
        if mx.null_mx:  # RFC 7505 3.2 / 4.2
            raise _Unreachable(Result("perm", str(replies.NULL_MX.fill(domain=domain))))
        if mx.temperror:
            reply = replies.DNS_TEMPFAIL.fill(domain=domain, reason=mx.reason)
            raise _Unreachable(Result("temp", str(reply)))
        if not mx.hosts:
            reply = replies.NO_ROUTE.fill(domain=domain, reason=mx.reason)
            raise _Unreachable(Result("perm", str(reply)))
        last = Result("temp", str(replies.NO_MX_ADDRESS.fill(domain=domain)))
        tried = 0
        for host in mx.hosts:
            addrs = await dnslookup.lookup_addresses(self._resolver, host)
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
            except _TLSFailed as exc:  # only with "try": opportunistic (RFC 7435), so a broken
                # TLS stack must not stop the mail
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
                    if starttls == "must":
                        reply = str(replies.STARTTLS_FAILED.fill(host=name, reason=_reason(exc)))
                        raise _Unreachable(Result("temp", reply, relay)) from None
                    raise _TLSFailed(_reason(exc)) from None
                await _hello(smtp)
            elif starttls == "must":
                reply = str(replies.STARTTLS_MISSING.fill(host=name))
                raise _Unreachable(Result("temp", reply, relay))
            if verify and d.smarthost.username:
                await smtp.login(d.smarthost.username, d.smarthost.password)
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise _Unreachable(Result("temp", _one(exc.code, exc.message), relay)) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            raise _Unreachable(
                Result("temp", str(replies.CONNECT_FAILED.fill(reason=_reason(exc))), relay)
            ) from None
        except _Unreachable:
            smtp.close()
            raise
        return _Conn(smtp, relay)

    async def close_idle(self, everything: bool = False) -> None:
        """QUIT politely (RFC 5321 4.1.1.10), briefly; then drop."""

        async def quit_one(conn: _Conn) -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await conn.smtp.quit()
            conn.smtp.close()

        conns = self._pool.expired(everything)
        if conns:
            await asyncio.gather(*(quit_one(c) for c in conns))


async def _transaction(conn: _Conn, sender: str, body: bytes, rcpts: Sequence[str]) -> list[Result]:
    smtp, relay = conn.smtp, conn.relay
    utf8 = not (sender.isascii() and all(r.isascii() for r in rcpts))
    options = []
    if smtp.supports_extension("size"):
        options.append(f"SIZE={len(body)}")  # RFC 1870
    if utf8 and smtp.supports_extension("smtputf8"):
        options.append("SMTPUTF8")  # RFC 6531
    if smtp.supports_extension("8bitmime") and not (body).isascii():
        options.append("BODY=8BITMIME")  # RFC 6152
    enc = "utf-8" if utf8 else "ascii"
    results: dict[int, Result] = {}
    accepted: list[int] = []
    started = False
    try:
        try:
            await smtp.mail(sender, options=options, encoding=enc)
        except aiosmtplib.SMTPSenderRefused as exc:
            await _rset(smtp)
            return [classify(exc.code, exc.message, relay)] * len(rcpts)
        started = True
        for i, rcpt in enumerate(rcpts):
            try:
                await smtp.rcpt(rcpt, encoding=enc)
                accepted.append(i)
            except aiosmtplib.SMTPRecipientRefused as exc:
                results[i] = classify(exc.code, exc.message, relay)
        if accepted:
            try:
                resp = await smtp.data(body)
                ok = classify(resp.code, resp.message, relay)
            except aiosmtplib.SMTPDataError as exc:
                ok = classify(exc.code, exc.message, relay)
                await _rset(smtp)
            for i in accepted:
                results[i] = ok
        else:
            await _rset(smtp)
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
        if not started and conn.idle_since:
            raise _Stale from exc
        smtp.close()
        fail = Result("temp", str(replies.CONNECTION_LOST_DETAIL.fill(reason=_reason(exc))), relay)
    except (aiosmtplib.SMTPException, TimeoutError, OSError) as exc:
        smtp.close()
        fail = Result("temp", str(replies.NETWORK_ERROR.fill(reason=_reason(exc))), relay)
    else:
        return [results[i] for i in range(len(rcpts))]
    return [results.get(i, fail) for i in range(len(rcpts))]


class _Stale(Exception):
    """A pooled connection turned out closed before the transaction began: dial afresh."""


class _TLSFailed(Exception):
    """Opportunistic STARTTLS was offered but failed: the caller retries in plaintext."""


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
    return f"{code} {text}"  # made one printable line by Result


def _clean(text: str, limit: int | None) -> str:
    """One line of printable ASCII: white space runs (a multi-line reply's line breaks) become
    one space, anything else unprintable '?', at most ``limit`` characters."""
    return maillog.printable(" ".join(text.split()), limit, ascii_only=True)


def _reason(exc: BaseException) -> str:
    """An error's text for our own reasons and the log: what a peer said (its reply, not the
    exception's repr of it), printable, its first ``REASON_LIMIT`` characters."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        text = f"{exc.code} {exc.message}"
    else:
        text = str(exc) or type(exc).__name__
    return _clean(text, None)[:REASON_LIMIT]
