"""A scripted upstream SMTP server (raw asyncio, loopback, ephemeral port), for the tests where a
peer must misbehave at an exact point, which the aiosmtpd sink (tests/sink.py) cannot be made to.

By default it greets, offers ``extensions`` to EHLO, answers 250 to every command and 354 to DATA,
and records every command line and every message per connection (numbered from 1). Then:

- ``greet=False``: a tarpit; it accepts connections and never says or reads anything (a hung or
  overloaded host) until stopped.
- ``drop_at`` holds ``(connection, verb, n)``: at the n-th ``verb`` of that connection it closes
  the connection without replying. ``ANY`` as the connection means every connection. Besides
  command verbs: ``"."`` is the end of a message (its content is recorded first, as a server that
  crashed before its reply would have it) and ``"content"`` a line of message content (the cut
  comes in the middle of the transfer; what was read is kept in ``partial``).
- ``hang_at``, the same way: from there on it reads, and never answers again.
- ``replies``: verb -> a scripted reply instead of the usual one.
- ``ehlo_reply`` (a 502: a server that knows only HELO), ``starttls_reply`` (STARTTLS offered and
  answered with it), ``tls_context`` (implicit TLS from the first byte), ``answer_quit=False``
  (a peer that never answers QUIT).
- ``hold_mail=True``: each MAIL is answered only when the test lets one through (``release``,
  ``release_all``), so a transaction stays open exactly as long as the test wants, no timing.
  ``held`` is how many wait now, ``open`` the transactions between MAIL and the end of DATA (or
  RSET, or hang-up), ``max_open`` the most at once; ``wait_for`` waits for any of it.

``await up.stop()`` closes the listener and every connection, freeing the port for a real
:class:`tests.sink.Sink` on the same port (the host "comes back").
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable

ANY = 0  # in drop_at and hang_at: at that point of every connection


class Upstream:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        greet: bool = True,
        extensions: tuple[str, ...] = ("SIZE 10240000", "8BITMIME", "SMTPUTF8"),
        starttls_reply: bytes | None = None,
        ehlo_reply: bytes | None = None,
        tls_context: ssl.SSLContext | None = None,
        answer_quit: bool = True,
        hold_mail: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.greet = greet
        self.ehlo_reply = ehlo_reply
        self.tls_context = tls_context
        self.tls: list[bool] = []  # per connection: was it TLS
        self.answer_quit = answer_quit
        self.extensions = extensions + (("STARTTLS",) if starttls_reply else ())
        self.starttls_reply = starttls_reply
        self.drop_at: set[tuple[int, str, int]] = set()
        self.hang_at: set[tuple[int, str, int]] = set()
        self.replies: dict[str, bytes] = {}
        self.lines: list[tuple[int, str]] = []  # (connection number, command line)
        self.messages: list[tuple[int, bytes]] = []  # (connection number, content)
        self.partial: list[tuple[int, bytes]] = []  # content read before a "content" cut
        self.connections = 0
        self.free = not hold_mail  # answer every MAIL at once
        self.held = 0
        self.open = 0
        self.max_open = 0
        self._tokens = asyncio.Semaphore(0)
        self._cond = asyncio.Condition()
        self._stopped = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def commands(self, conn: int) -> list[str]:
        return [line for n, line in self.lines if n == conn]

    @property
    def senders(self) -> list[str]:
        """The reverse-path of every MAIL command read, in order."""
        return [
            line.split("<", 1)[1].split(">", 1)[0]
            for _, line in self.lines
            if line[:4].upper() == "MAIL"
        ]

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._tokens.release()

    def release_all(self) -> None:
        self.free = True
        self.release(self.held)

    async def wait_for(self, pred: Callable[[Upstream], bool], within: float = 10) -> None:
        async with asyncio.timeout(within), self._cond:
            await self._cond.wait_for(lambda: pred(self))

    async def _changed(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, ssl=self.tls_context
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._stopped.set()
        self.release_all()  # nothing may stay waiting for a release that will not come
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        self.tls.append(writer.get_extra_info("ssl_object") is not None)
        seen: dict[str, int] = {}
        in_tx = False
        self._writers.add(writer)

        def at(verb: str, points: set[tuple[int, str, int]]) -> bool:
            return (conn, verb, seen[verb]) in points or (ANY, verb, seen[verb]) in points

        def drop(verb: str) -> bool:
            seen[verb] = seen.get(verb, 0) + 1
            return at(verb, self.drop_at)

        async def end_tx() -> None:
            nonlocal in_tx
            if in_tx:
                in_tx = False
                self.open -= 1
                await self._changed()

        try:
            if not self.greet:
                await self._stopped.wait()
                return
            writer.write(b"220 upstream.test ESMTP\r\n")
            while line := await reader.readline():
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                self.lines.append((conn, text))
                await self._changed()
                verb = text.split(" ", 1)[0].upper()
                if drop(verb):
                    return
                if at(verb, self.hang_at):
                    while await reader.readline():
                        pass
                    return
                if verb in self.replies:
                    writer.write(self.replies[verb])
                    await writer.drain()
                    continue
                if verb == "EHLO" and self.ehlo_reply:
                    writer.write(self.ehlo_reply)
                elif verb == "EHLO":
                    ext = ["upstream.test", *self.extensions]
                    reply = "".join(
                        f"250{'-' if i < len(ext) - 1 else ' '}{e}\r\n" for i, e in enumerate(ext)
                    )
                    writer.write(reply.encode())
                elif verb == "STARTTLS" and self.starttls_reply:
                    writer.write(self.starttls_reply)
                elif verb == "MAIL":
                    in_tx = True
                    self.open += 1
                    self.max_open = max(self.max_open, self.open)
                    if not self.free:
                        self.held += 1
                        await self._changed()
                        await self._tokens.acquire()
                        self.held -= 1
                    writer.write(b"250 2.1.0 OK\r\n")
                    await self._changed()
                elif verb == "DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    content = b""
                    while (chunk := await reader.readline()) not in (b".\r\n", b""):
                        content += chunk
                        if drop("content"):
                            self.partial.append((conn, content))
                            return
                    self.messages.append((conn, content))
                    if drop("."):
                        return
                    writer.write(b"250 2.0.0 accepted\r\n")
                    await end_tx()
                elif verb == "RSET":
                    writer.write(b"250 2.0.0 OK\r\n")
                    await end_tx()
                elif verb == "QUIT" and not self.answer_quit:
                    continue  # until the client gives up and hangs up
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 2.0.0 OK\r\n")
                await writer.drain()
        except ConnectionError:
            return
        finally:
            await end_tx()
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
