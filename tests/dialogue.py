"""A tiny SMTP dialogue driver for exact-reply checks: send a line, expect a reply prefix.

d = await Dialogue.open(port)                # reads the 220 greeting
await d.expect_after("EHLO x", "250")        # multi-line replies are read to their last line
await d.starttls(ctx)
await d.expect_after("AUTH PLAIN " + blob, "535 5.7.8")
"""

from __future__ import annotations

import asyncio
import base64
import ssl

from tests import leaks


class Dialogue:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.tail = b""  # what closed() read before the end of the stream

    @classmethod
    async def open(
        cls,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        greeting: str = "220",
        source: str | None = None,
    ) -> Dialogue:
        """``source``: the loopback address to connect from (127.0.0.2: another client)."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=tls,
            server_hostname="relay.test" if tls else None,
            local_addr=(source, 0) if source else None,
        )
        d = cls(reader, writer)
        if greeting:
            await d.expect(greeting)
        return d

    async def reply(self, within: float = 10) -> str:
        """One whole reply (all its lines), as text joined by newlines."""
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), within)
            if not raw:
                raise ConnectionError("connection closed; got so far: " + repr(lines))
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return leaks.observe("\n".join(lines))  # checked for secrets at teardown

    async def expect(self, prefix: str, within: float = 10) -> str:
        text = await self.reply(within)
        last = text.rsplit("\n", 1)[-1]
        assert last.startswith(prefix), f"expected {prefix!r}, got {text!r}"
        return text

    def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode("utf-8")
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        self.writer.write(data)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def expect_after(self, line: str | bytes, prefix: str, within: float = 10) -> str:
        self.send(line)
        await self.writer.drain()
        return await self.expect(prefix, within)

    async def reply_after(self, line: str | bytes, within: float = 10) -> str:
        self.send(line)
        await self.writer.drain()
        return await self.reply(within)

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        await self.expect_after("STARTTLS", "220")
        await self.writer.start_tls(ctx, server_hostname="relay.test")

    async def login(self, login: str, password: str, ehlo: str = "client.test") -> None:
        await self.expect_after(f"EHLO {ehlo}", "250")
        blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        await self.expect_after(f"AUTH PLAIN {blob}", "235 2.7.0")

    async def closed(self, within: float = 10) -> bool:
        """True if the server closes the connection (EOF, or a reset) within ``within`` seconds;
        False if it is still open then. Bytes it sent before closing are kept in ``self.tail``."""
        try:
            async with asyncio.timeout(within):
                while chunk := await self.reader.read(65536):
                    self.tail += chunk
                    leaks.observe(chunk.decode("utf-8", "replace"))
        except TimeoutError:
            return False
        except ConnectionError:  # reset (or aborted) by the server: closed too
            return True
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def b64(text: str | bytes) -> str:
    raw = text if isinstance(text, bytes) else text.encode()
    return base64.b64encode(raw).decode()
