"""Our aiosmtpd ``SMTP`` protocol: connection limits, draining, DATA and AUTH reading.

aiosmtpd does the protocol; this subclass changes what a production relay needs changed:

- DATA is read by our own reader (relay/smtp/data.py): only ``CRLF.CRLF`` ends it (RFC 5321
  4.1.1.4), a bare CR or LF or a NUL anywhere is refused with 554 5.6.0 after the terminator (SMTP
  smuggling defence), the size limit is enforced while reading, and memory is reserved from a
  shared budget, within the user's and the client address's shares, by the declared SIZE= or as
  the message grows (over budget or share -> 451 4.3.1). The whole DATA transfer is bounded by
  ``limits.data_timeout``.
- Connections are counted in total and per client IP from accept, a TLS handshake included (the
  implicit-TLS listener hands over plain TCP and the session does the handshake, bounded by
  ``limits.tls_handshake_timeout``, as STARTTLS is); over a limit the client gets 421 at once, or
  on the implicit-TLS listener a close before any handshake. A failed handshake is one
  rate-limited mail-log line (the gate), never a traceback; STARTTLS inside TLS gets 503 5.5.1.
- Commands that bring no message closer are bounded by ``limits.max_idle_commands`` (421).
- On shutdown (drain), idle sessions get 421 and are closed; a session in the middle of a
  transaction may finish it, then gets 421 at its next command.
- AUTH responses are read with one bounded length, inline or after a 334 (relay/smtp/reader.py),
  and decoded here (RFC 4954 4: "*" cancels); mechanism names are case-insensitive.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import functools
import logging
from base64 import b64decode, b64encode
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, syntax

from relay import grammar, replies
from relay.replies import Reply
from relay.smtp.auth import Identity
from relay.smtp.controls import Grant
from relay.smtp.data import DataReader, declared_size
from relay.smtp.gate import Gate
from relay.smtp.reader import AUTH_COMMAND_LIMIT, CommandReader
from relay.smtp.spill import Spill
from relay.smtp.tls import TLSSMTP

log = logging.getLogger("relaybox.session")


@dataclass
class SessionState:
    """What our handler keeps per connection (aiosmtpd's Session is for protocol state)."""

    ip: str
    listener_mode: str
    identity: Identity | None = None  # once authenticated
    grant: Grant | None = None  # what MAIL FROM read for the transaction (relay/smtp/controls.py)
    auth_failures: int = 0
    busy: bool = False
    in_data: bool = False
    spill: Spill | None = None  # in DATA, a large message's body on disk (relay/smtp/spill.py)
    messages: int = 0
    idle_commands: int = 0  # since the last accepted message (limits.max_idle_commands)


@functools.cache
def _class_hooks(cls: type, prefixes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n for n in dir(cls) if n.startswith(prefixes))


def hook_names(obj: object, prefixes: tuple[str, ...]) -> list[str]:
    """``dir(obj)`` as far as aiosmtpd's constructor reads it: the names starting with one of
    ``prefixes`` (its class's, listed once per class, and the instance's own).

    aiosmtpd builds its hook tables for every new session with ``inspect.getmembers`` of the
    session and of the handler, which fetches every attribute of both: ~0.17 ms a connection,
    ~5 % of a fresh TLS session's CPU here (bench/README.md). The classes that define
    ``__dir__`` with this give it the same tables from a few names."""
    own = [n for n in vars(obj) if n.startswith(prefixes)]
    cls: Any = type(obj)  # a class is hashable; mypy reads type[object] as maybe not
    return [*_class_hooks(cls, prefixes), *own]


class RelaySMTP(TLSSMTP):
    def __init__(
        self,
        gate: Gate,
        handler: object,
        listener_mode: str,
        *,
        client: tuple[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        """``handler``: the hooks aiosmtpd calls by name (relay.smtp.handler.Handler).
        ``client``: the client's address from a trusted balancer's PROXY header (None: the
        socket's peer); it is the session's address everywhere (relay/service/proxyproto.py)."""
        # Sessions are made by the running loop; named, aiosmtpd does not look for one with
        # warnings caught and filtered (~30 µs a session).
        kwargs.setdefault("loop", asyncio.get_running_loop())
        super().__init__(handler, **kwargs)
        self.gate = gate
        self.listener_mode = listener_mode
        self.client = client
        self.state: SessionState | None = None
        self._counted_ip: str | None = None
        self._refusal: Reply | None = None  # decided at accept
        self._continued: list[bytes] = []  # lines of a multi-line reply not yet written (push)
        # aiosmtpd's command size limits are one dict shared by every session (each new session
        # clears it); ours is per session, with AUTH's allowance (relay/smtp/reader.py).
        self.command_size_limits = collections.defaultdict(
            lambda: SMTP.command_size_limit, {"AUTH": AUTH_COMMAND_LIMIT}
        )
        # aiosmtpd makes a plain StreamReader and has no hook for another kind: set the stream
        # protocol up again around ours, before any connection (the first one is never used).
        self._commands = CommandReader(
            self._between_commands, limit=self.line_length_limit, loop=self.loop
        )
        asyncio.StreamReaderProtocol.__init__(
            self, self._commands, client_connected_cb=self._cb_client_connected, loop=self.loop
        )
        # Wrap every command so draining and "busy" are known without touching aiosmtpd's loop.
        for name, method in list(self._smtp_methods.items()):
            self._smtp_methods[name] = self._guarded(name, method)

    def __dir__(self) -> list[str]:
        return hook_names(self, ("smtp_", "auth_"))  # what aiosmtpd's constructor reads

    async def push(self, status: str | bytes) -> None:
        """aiosmtpd writes a reply a line at a time, each its own TLS record and send (EHLO:
        seven). A continuation line (``250-``) is held and goes out with the reply's last line,
        in one write."""
        charset = "utf-8" if self.enable_SMTPUTF8 else "ascii"
        line = status if isinstance(status, bytes) else status.encode(charset)
        if line[3:4] == b"-" and b"\n" not in line:
            self._continued.append(line)
            return
        if self._continued:
            line = b"\r\n".join([*self._continued, line])
            self._continued.clear()
        await super().push(line)

    def _between_commands(self) -> bool:
        return self.state is None or not self.state.busy

    def _guarded(
        self, name: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        async def run(arg: str | None) -> None:
            st = self.state
            if st is not None and self.gate.draining and not self.in_transaction():
                await self.push(str(replies.SHUTTING_DOWN))
                self.close()
                return
            limit = self.gate.limits.max_idle_commands
            if st is not None and name != "QUIT" and st.idle_commands >= limit:
                await self.close_with(replies.TOO_MANY_COMMANDS)
                return
            before = self._progress()
            if st is not None:
                st.busy = True
            try:
                await method(arg)
            finally:
                if st is not None:
                    st.busy = False
            self._count_idle(name, before)

        return run

    def _progress(self) -> tuple[int, bool, int]:
        """Messages accepted, whether MAIL was, and recipients accepted so far."""
        env, st = self.envelope, self.state
        messages = st.messages if st is not None else 0
        if env is None:
            return messages, False, 0
        return messages, bool(env.mail_from), len(env.rcpt_tos)

    def _count_idle(self, name: str, before: tuple[int, bool, int]) -> None:
        """NOOP, RSET, HELP, VRFY... each reset the idle timer, so they kept a session for ever:
        count every command that brings no message closer (an accepted MAIL or RCPT does, and
        max_recipients bounds those) since the last accepted message."""
        st = self.state  # after STARTTLS a new state, which carries the count
        if st is None:
            return
        messages, mail, rcpts = self._progress()
        advanced = (name == "MAIL" and mail and not before[1]) or (
            name == "RCPT" and rcpts > before[2]
        )
        if messages > before[0]:
            st.idle_commands = 0
        elif not advanced:
            st.idle_commands += 1

    # --- connection accounting (TLSSMTP's hooks) ---------------------------------------------

    def accepted(self, transport: asyncio.BaseTransport) -> bool:
        """Counted from accept, before any TLS: a silent handshake holds a counted place."""
        peer = self.client or transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else "unknown"
        self.state = SessionState(ip=ip, listener_mode=self.listener_mode)
        self._counted_ip = ip
        self.gate.opened(self, ip)
        self._refusal = self.gate.admission(ip)
        return self._refusal is None

    def released(self) -> None:
        if self._counted_ip is not None:
            self.gate.closed(self, self._counted_ip)
            self._counted_ip = None

    def handshake_timeout(self) -> float:
        return float(self.gate.limits.tls_handshake_timeout)

    def handshake_failed(self, reason: str) -> None:
        assert self.state is not None
        self.gate.handshake_failed(self.state.ip, self.listener_mode, reason)

    def tls_started(self) -> None:
        # RFC 3207 4.2: forget what the client said before TLS, its AUTH included (possible
        # only with auth.allow_plaintext); the failure and idle counts go on.
        old = self.state
        assert old is not None
        self.state = SessionState(
            ip=old.ip,
            listener_mode=old.listener_mode,
            auth_failures=old.auth_failures,
            idle_commands=old.idle_commands,
        )

    async def _handle_client(self) -> None:
        if self._refusal is not None:
            await self.push(str(self._refusal))
            self.close()
            self.released()  # at once: a refused connection must not crowd out the next
            return
        await super()._handle_client()

    async def close_with(self, reply: Reply) -> None:
        """Say ``reply`` (within a second, if the connection still takes it), then close."""
        with contextlib.suppress(Exception):
            if self.transport is not None and not self.transport.is_closing():
                await asyncio.wait_for(self.push(str(reply)), 1)
        self.close()

    def _timeout_cb(self) -> None:
        # Idle (or DATA) timeout: say so with 421 4.4.2 (RFC 5321 3.8) before aiosmtpd closes,
        # rather than a silent close the client reads as a network fault.
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(f"{replies.IDLE_TIMEOUT}\r\n".encode())
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def in_transaction(self) -> bool:
        st = self.state
        return bool(
            (st is not None and st.in_data)
            or (self.envelope is not None and self.envelope.mail_from)
        )

    def is_idle(self) -> bool:
        return self.state is not None and not self.state.busy and not self.in_transaction()

    # --- AUTH helpers ------------------------------------------------------------------------

    @syntax("AUTH <mechanism>")
    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Fast path for the common ``<local@domain> PARAMS`` form; aiosmtpd's parser otherwise.

        aiosmtpd parses every MAIL and RCPT address with the email package's RFC 5322 parser,
        about a tenth of the server's CPU per message. A bracketed dot-atom address needs none of
        that: the result is the same string (a test compares both on generated addresses).
        """
        m = grammar.SIMPLE_PATH.match(arg)
        if m is not None:
            return m.group(1), m.group(2) or ""
        try:
            address, rest = super()._getaddr(arg)
            return address, rest
        except Exception:  # its parser raises IndexError etc. on junk such as "<"
            return None, None  # "malformed address", not a 451 with a logged traceback

    async def smtp_PROXY(self, arg: str) -> None:
        """A PROXY header from a peer that is not a trusted balancer (one of those has its
        header read before the session: relay/service/proxyproto.py): refused, and the
        connection ends; it would otherwise claim any client address."""
        await self.close_with(replies.PROXY_REFUSED)

    async def smtp_AUTH(self, arg: str) -> None:
        # RFC 4954 4: AUTH after a successful AUTH is a 503; aiosmtpd's own has no enhanced code.
        if self.session is not None and self.session.authenticated:
            await self.push(str(replies.AUTH_ALREADY))
            return
        await super().smtp_AUTH(arg)

    # Not named auth_*: aiosmtpd takes every auth_* method of the protocol or handler for a SASL
    # mechanism, advertises it in EHLO and calls it on "AUTH <name>".
    async def sasl_response(self, challenge: bytes) -> bytes | None:
        """Send a 334 challenge and return the decoded response, or None after replying.

        None means a reply was already sent: "*" (cancelled, 501 5.7.0) or undecodable base64
        or an overlong line (501 5.5.2).
        """
        await self.push(b"334 " + b64encode(challenge))
        line = await self._commands.read_response()
        if line is None:
            await self.push(str(replies.AUTH_MALFORMED))
            return None
        blob = line.rstrip(b"\r\n").strip()
        if blob == b"*":
            await self.push(str(replies.AUTH_CANCELLED))
            return None
        return await self.decode_b64(blob)

    async def decode_b64(self, blob: bytes) -> bytes | None:
        if blob == b"=":  # RFC 4954 4: "=" is an empty initial response
            return b""
        try:
            return b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            await self.push(str(replies.AUTH_MALFORMED))
            return None

    # --- DATA --------------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.state is not None
        identity = self.state.identity
        if identity is None:
            await self.push(str(replies.AUTH_REQUIRED))
            return
        if not self.envelope.rcpt_tos:
            await self.push(str(replies.NEED_RCPT))
            return
        if arg:
            await self.push(str(replies.DATA_SYNTAX))
            return
        limits = self.gate.limits
        # Reserved within this user's and this address's shares, grown as the message grows, and
        # released below even when reading fails (a client that disconnects or times out
        # mid-DATA must not keep its share).
        hold = self.gate.memory.hold(identity.login, self.state.ip)
        disk = self.gate.disk.hold(identity.login, self.state.ip)  # a large body's, on disk
        data = DataReader(
            int(limits.max_message_size),
            hold,
            declared_size(self.envelope.mail_options),
            normalize=limits.bare_newline == "normalize",
            spill_dir=self.gate.spill_dir,
            disk=disk,
        )
        if not data.begin():
            await self.push(str(replies.MEMORY_BUSY))
            return
        self.state.in_data = True
        try:
            await self.push(str(replies.START_DATA))
            self._reset_timeout(limits.data_timeout)
            reply, content = await data.read(self._reader)
            if reply is None:
                assert content is not None
                self.envelope.original_content = content  # the header section, if spilled
                self.envelope.content = content
                self.state.spill = data.spill
                status = await self.event_handler.handle_DATA(self, self.session, self.envelope)
            else:
                status = str(reply)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(status)
        finally:
            hold.release()
            disk.release()  # its file is closed just below (a cancellation cannot skip this)
            self.state.in_data = False
            self.state.spill = None
            if data.spill is not None:  # queued by now (copied into the spool), or refused
                await data.spill.close()
            if self.transport is not None:  # back to the idle timer, unless already gone
                self._reset_timeout()
