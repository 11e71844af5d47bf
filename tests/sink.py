"""Fixture plugin: upstream SMTP sinks (aiosmtpd) that record what relaybox delivers to them.

A :class:`Sink` listens on loopback in the test's own event loop (``loop.create_server``, no second
loop in a thread), records every envelope and the exact bytes received, and answers as scripted:
per recipient and per attempt (``sink.script_rcpt("a@x", "451 4.3.0 later", "250 OK")``), at MAIL or
at the end of DATA. ``await sink.stop()`` makes it refuse connections (a host that is down) and
``await sink.start()`` brings it back on the same address and port. MX tests bind further sinks on
127.0.0.2, 127.0.0.3... with the SAME port, since relaybox delivers to one configured port.
Waiting is on a condition, never on a sleep: ``await sink.wait_received(2)``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

WAIT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Received:
    """One message as the sink accepted it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # exact bytes after dot-unstuffing, CRLF line endings
    tls: bool
    helo: str


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.sink.commands.append(("MAIL", address))
        reply = self.sink._next(self.sink._mail_script)
        if reply.startswith("2"):
            envelope.mail_from = address  # "<>" for the null reverse-path (aiosmtpd needs truthy)
            envelope.mail_options.extend(options)
        return reply

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.sink.commands.append(("RCPT", address))
        reply = self.sink._next(self.sink._rcpt_scripts.get(address.lower()))
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.sink.commands.append(("DATA", ",".join(envelope.rcpt_tos)))
        reply = self.sink._next(self.sink._data_script)
        if reply.startswith("2"):
            data = envelope.original_content or b""
            self.sink._record(
                Received(
                    "" if envelope.mail_from == "<>" else envelope.mail_from or "",
                    tuple(envelope.rcpt_tos),
                    bytes(data),
                    session.ssl is not None,
                    session.host_name or "",
                )
            )
        return reply


class _SinkSMTP(SMTP):
    """Counts open sessions (tests check per-destination concurrency limits)."""

    def __init__(self, sink: Sink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sink.active += 1
        self._sink.max_active = max(self._sink.max_active, self._sink.active)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._sink.active -= 1
        super().connection_lost(exc)


class Sink:
    """An aiosmtpd server on ``host:port`` in the running loop."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        tls_context: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
    ):
        self.host = host
        self.credentials = credentials  # offer AUTH (after STARTTLS) and accept only these
        self.logins: list[tuple[str, bool]] = []
        self.port = 0
        self.tls_context = tls_context
        self.received: list[Received] = []
        self.commands: list[tuple[str, str]] = []
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self._protocols: list[SMTP] = []
        self._server: asyncio.Server | None = None
        self._cond = asyncio.Condition()
        self._rcpt_scripts: dict[str, deque[str]] = {}
        self._mail_script: deque[str] = deque()
        self._data_script: deque[str] = deque()

    # --- scripting -----------------------------------------------------------------------------

    def script_rcpt(self, address: str, *replies: str) -> None:
        """Replies to successive RCPT TO:<address> (any connection); then 250."""
        self._rcpt_scripts.setdefault(address.lower(), deque()).extend(replies)

    def script_mail(self, *replies: str) -> None:
        self._mail_script.extend(replies)

    def script_data(self, *replies: str) -> None:
        """Replies to successive end-of-DATA; then 250."""
        self._data_script.extend(replies)

    @staticmethod
    def _next(script: deque[str] | None) -> str:
        if script:
            return script.popleft()
        return "250 OK"

    def _record(self, item: Received) -> None:
        self.received.append(item)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    # --- lifecycle -----------------------------------------------------------------------------

    def _protocol(self) -> SMTP:
        self.connections += 1
        proto = _SinkSMTP(
            self,
            _Handler(self),
            hostname="sink.test",
            tls_context=self.tls_context,
            require_starttls=False,
            # A sync authenticator (an async one would be an auth bypass in aiosmtpd 1.4.6).
            authenticator=self._authenticate if self.credentials else None,
            auth_require_tls=self.credentials is not None,
            decode_data=False,
            enable_SMTPUTF8=True,
        )
        self._protocols.append(proto)
        return proto

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        login = data.login.decode() if isinstance(data, LoginPassword) else ""
        ok = isinstance(data, LoginPassword) and (login, data.password.decode()) == self.credentials
        self.logins.append((login, ok))
        return AuthResult(success=ok, handled=False)

    async def start(self) -> None:
        """Listen (again) on host:port; port 0 picks a free one the first time."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop open connections: the host is now down (connection refused)."""
        if self._server is not None:
            self._server.close()
            protocols, self._protocols = self._protocols, []
            for proto in protocols:
                if proto.transport is not None:
                    proto.transport.close()
            await self._server.wait_closed()
            self._server = None
            # Let the transports finish closing (connection_lost) before the test's loop ends;
            # otherwise they are collected half-closed and warn (an error under filterwarnings).
            for _ in range(200):
                if all(p.transport is None for p in protocols):
                    break
                await asyncio.sleep(0.005)  # sleep-ok: bounded wait for close callbacks

    async def wait_for(self, pred: Callable[[Sink], bool], within: float = WAIT_TIMEOUT) -> None:
        async with asyncio.timeout(within), self._cond:
            await self._cond.wait_for(lambda: pred(self))

    async def wait_received(self, n: int, within: float = WAIT_TIMEOUT) -> list[Received]:
        await self.wait_for(lambda s: len(s.received) >= n, within)
        return self.received


SinkFactory = Callable[..., Awaitable[Sink]]


@pytest.fixture
async def sink_factory() -> AsyncIterator[SinkFactory]:
    """Start more sinks: ``await sink_factory(host="127.0.0.2", port=sink.port)``."""
    sinks: list[Sink] = []

    async def make(host: str = "127.0.0.1", port: int = 0, **kw: Any) -> Sink:
        s = Sink(host, **kw)
        s.port = port
        await s.start()
        sinks.append(s)
        return s

    yield make
    for s in sinks:
        await s.stop()


@pytest.fixture
async def sink(sink_factory: SinkFactory) -> Sink:
    """One sink on 127.0.0.1, ephemeral port, no TLS."""
    return await sink_factory()
