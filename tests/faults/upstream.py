"""A misbehaving upstream SMTP server for fault tests (raw asyncio, loopback, ephemeral port).

``tarpit``        accepts the connection and never says anything (a hung or overloaded host).
``drop-in-data``  greets, accepts EHLO/MAIL/RCPT, answers DATA with 354, reads the first line of
                  the message and drops the connection (a crash or a network cut mid-transfer).

``await bad.stop()`` closes the listener and every connection, freeing the port for a real
:class:`tests.sink.Sink` on the same port (the host "comes back").
"""

from __future__ import annotations

import asyncio
import contextlib


class BadUpstream:
    def __init__(self, mode: str) -> None:
        assert mode in ("tarpit", "drop-in-data")
        self.mode = mode
        self.port = 0
        self.connections = 0
        self.data_started = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            if self.mode == "tarpit":
                await self._stopped.wait()
                return
            writer.write(b"220 bad.test ESMTP\r\n")
            while not self._stopped.is_set():
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    await reader.readline()
                    self.data_started += 1
                    return  # drop the connection in the middle of the message
                if verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                writer.write(b"250 bad.test\r\n")
                await writer.drain()
        except ConnectionError:
            return
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
