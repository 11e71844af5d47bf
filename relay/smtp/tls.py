"""Server-side TLS for a session: the handshake bounded in time, its failure named in one word.

Every handshake runs on a connection the gate already counts (relay/smtp/session.py):

- implicit TLS (RFC 8314, port 465): the listener accepts plain TCP (relay/service/listen.py)
  and the session wraps it with :func:`accept_tls`, so a client that never finishes its handshake
  holds one counted place for at most ``limits.tls_handshake_timeout``. ``create_server(ssl=)``
  would show the session the connection only after the handshake, uncounted until then, and
  wait asyncio's default 60 s.
- STARTTLS (RFC 3207): aiosmtpd builds the TLS layer itself with asyncio's default 60 s and, on a
  failure, raises into its command loop, which logs a traceback; the session overrides it
  (same steps, bounded, and a failure ends the session quietly).

A failed handshake is the client's doing (a scanner, an old TLS version, garbage): it is worth
one mail-log line (the gate writes it, rate-limited), never an ERROR with a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from asyncio import sslproto
from typing import Any

from aiosmtpd.smtp import SMTP, syntax

from relay import replies


class TLSSMTP(SMTP):
    """aiosmtpd's ``SMTP`` with every server-side handshake done here, bounded in time.

    The subclass (relay.smtp.session.RelaySMTP) decides through four hooks: :meth:`accepted`
    (count the connection, say whether it may go on), :meth:`released` (it is gone: uncount;
    called on every way out, so it must be idempotent), :meth:`handshake_failed`, and
    :meth:`tls_started` (STARTTLS done: RFC 3207 4.2, forget what was said before).
    """

    def __init__(
        self, handler: object, *, implicit_tls: ssl.SSLContext | None = None, **kwargs: Any
    ) -> None:
        """``implicit_tls``: the context of an implicit-TLS listener (RFC 8314), which hands
        over plain TCP; None on a STARTTLS listener (its context is aiosmtpd's tls_context)."""
        super().__init__(handler, **kwargs)
        self._implicit_tls = implicit_tls
        self._plain: asyncio.Transport | None = None  # during an implicit-TLS handshake
        self._handshake: asyncio.Task[None] | None = None
        self._accepted = False
        self._started = False  # aiosmtpd's side runs (after an implicit handshake, if any)
        self._early_eof = False  # the client closed before aiosmtpd's side started
        self._lost = False

    # --- hooks -------------------------------------------------------------------------------

    def handshake_timeout(self) -> float:
        raise NotImplementedError

    def accepted(self, transport: asyncio.BaseTransport) -> bool:
        """A new connection, before anything is read: may it go on? On a STARTTLS listener
        aiosmtpd's session starts either way (the subclass says 421 in it)."""
        return True

    def released(self) -> None:
        """The connection is gone, or going (idempotent)."""

    def handshake_failed(self, reason: str) -> None:
        """A handshake failed: ``reason`` from :func:`failure_reason`."""

    def tls_started(self) -> None:
        """STARTTLS done; aiosmtpd has made a new Session."""

    # --- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._accepted:  # STARTTLS done: aiosmtpd's TLS layer calls this again
            super().connection_made(transport)
            self.tls_started()
            return
        self._accepted = True
        go_on = self.accepted(transport)
        if self._implicit_tls is None:
            self._start(transport)
        elif not go_on:
            # Refused before TLS: closed at once. A 421 would need the handshake (CPU, and a
            # place for up to tls_handshake_timeout) that the limit is there to deny.
            transport.close()
            self.released()
        else:
            assert isinstance(transport, asyncio.Transport)  # a socket transport, not yet TLS
            self._plain = transport
            self._handshake = self.loop.create_task(self._implicit_handshake(transport))

    async def _implicit_handshake(self, plain: asyncio.Transport) -> None:
        assert self._implicit_tls is not None
        try:
            tls, reason = await accept_tls(
                self.loop, plain, self, self._implicit_tls, self.handshake_timeout()
            )
        except BaseException:  # cancelled (the loop ends), or a bug: the place is given back
            self.released()
            raise
        finally:
            self._plain = None
        if tls is None:
            self.handshake_failed(reason)
            self.released()
            return
        if self._lost:  # gone in the turn between the handshake and this task's
            self.released()
            return
        self._start(tls)  # aiosmtpd's session begins, as after create_server(ssl=...)

    def _start(self, transport: asyncio.BaseTransport) -> None:
        self._started = True
        super().connection_made(transport)
        if self._early_eof:
            super().eof_received()  # what it would have done then: the session ends

    def eof_received(self) -> bool | None:
        if not self._started:
            # Implicit TLS: the TLS layer read the client's close in the same turn as its last
            # handshake flight, before _implicit_handshake could start aiosmtpd's session (whose
            # eof_received needs it). Kept for _start; False: the TLS layer closes its side.
            self._early_eof = True
            return False
        return super().eof_received()

    def connection_lost(self, error: Exception | None) -> None:
        self._lost = True
        self.released()
        if self._started:  # else aiosmtpd never ran (refused, or its handshake failed)
            self._started = False
            super().connection_lost(error)
            # asyncio's stream protocol keeps the error (a client's reset) in a future nobody
            # awaits; aiosmtpd retrieves it when the session is collected, which at exit may come
            # after asyncio has logged "Future exception was never retrieved" with a traceback.
            closed = getattr(self, "_closed", None)
            if isinstance(closed, asyncio.Future) and closed.done() and not closed.cancelled():
                closed.exception()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        elif self._plain is not None:  # in its implicit-TLS handshake
            self._plain.close()

    # --- STARTTLS (RFC 3207) -----------------------------------------------------------------

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS, the same steps, with the handshake bounded and a failure ending
        the session quietly. No second TLS layer: 503 inside TLS (RFC 3207 4.2)."""
        if self._tls_protocol is not None or self._implicit_tls is not None:
            await self.push(str(replies.TLS_ALREADY))
            return
        if arg or not self.tls_context:
            await super().smtp_STARTTLS(arg)  # its 501 / 454
            return
        await self.push(str(replies.TLS_READY))
        waiter = self.loop.create_future()
        # typeshed types ssl_handshake_timeout as int; asyncio takes any positive number.
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True,
            ssl_handshake_timeout=self.handshake_timeout(),  # type: ignore[arg-type]
        )  # fmt: skip
        self._original_transport = plain = self.transport
        assert isinstance(plain, asyncio.Transport)
        plain.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(plain)
        failure: BaseException | None = None
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = exc
        if failure is None and self.session is not None and self.session.ssl is not None:
            return  # connection_made ran again: the session goes on inside TLS
        self.handshake_failed(failure_reason(failure))
        plain.close()
        self.connection_lost(None)  # what aiosmtpd does after a failed handshake: ends its loop


async def accept_tls(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    within: float,
) -> tuple[asyncio.Transport | None, str]:
    """The server side of a handshake on an accepted transport: (TLS transport, "") once it is
    done within ``within`` seconds, or (None, why it failed). The plain transport is closed on
    failure."""
    try:
        tls = await loop.start_tls(
            transport, protocol, context, server_side=True, ssl_handshake_timeout=within
        )
    except OSError as exc:  # ssl.SSLError, ConnectionError and TimeoutError are OSErrors
        transport.close()
        return None, failure_reason(exc)
    if tls is None:  # the plain transport was closed under it (a drain): no handshake
        return None, "closed"
    return tls, ""


def failure_reason(exc: BaseException | None) -> str:
    """A short token for a failed handshake (log field): "timeout", "closed", or OpenSSL's
    reason in lower case ("wrong_version_number", "unsupported_protocol", "no_shared_cipher")."""
    if exc is None:
        return "closed"
    if isinstance(exc, ssl.SSLEOFError):
        return "closed"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason == "UNEXPECTED_EOF_WHILE_READING":
            return "closed"
        return reason.lower() or "tls_error"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc):
        return "timeout"  # asyncio's ssl_handshake_timeout: "SSL handshake is taking longer..."
    if isinstance(exc, ConnectionError | EOFError):
        return "closed"
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode:
        return errno.errorcode[exc.errno].lower()
    return type(exc).__name__.lower()
