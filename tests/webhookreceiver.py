"""A webhook receiver on loopback: a small HTTP/1.1 server in the test's own event loop.

``asyncio.start_server`` on 127.0.0.1 port 0 (aiohttp is not in the test lock). It keeps
connections open (the poster reuses them), records every request whole, and answers as scripted:
``receiver.script(500, 500)`` answers the next two requests 500, then 200 again;
``receiver.default = 503`` changes what it answers after the script. Waiting is on a
condition, never on a sleep: ``await receiver.wait_for(lambda reqs: len(reqs) >= 3)``.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

WAIT_TIMEOUT = 20.0
MAX_BODY = 1 << 20


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lowercased
    body: bytes
    status: int  # what the receiver answered

    @property
    def event_id(self) -> str:
        return self.headers.get("webhook-id", "")

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.default = 200
        self.port = 0
        self._script: deque[int] = deque()
        self._cond = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def script(self, *statuses: int) -> None:
        self._script.extend(statuses)

    def answered(self, status: int = 200) -> list[Request]:
        return [r for r in self.requests if r.status == status]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None

    async def wait_for(
        self, done: Callable[[list[Request]], bool], within: float = WAIT_TIMEOUT
    ) -> list[Request]:
        try:
            async with asyncio.timeout(within):
                async with self._cond:
                    await self._cond.wait_for(lambda: done(self.requests))
        except TimeoutError:
            seen = [(r.status, r.headers.get("webhook-id")) for r in self.requests]
            raise AssertionError(f"the receiver did not get what was awaited; got {seen}") from None
        return list(self.requests)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _version = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    raw = (await reader.readline()).decode("latin-1")
                    if raw in ("\r\n", "\n", ""):
                        break
                    name, _sep, value = raw.partition(":")
                    headers[name.strip().lower()] = value.strip()
                size = int(headers.get("content-length", "0"))
                body = await reader.readexactly(min(size, MAX_BODY))
                status = self._script.popleft() if self._script else self.default
                async with self._cond:
                    self.requests.append(Request(method, path, headers, body, status))
                    self._cond.notify_all()
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\n"
                    "Content-Length: 2\r\n\r\nok".encode("latin-1")
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()


@asynccontextmanager
async def running() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()
