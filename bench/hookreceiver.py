"""A webhook receiver for the bench: HTTP/1.1 on loopback, 204 to every POST, keep-alive.

``python -m bench.hookreceiver --port 0`` logs ``listening address=127.0.0.1 port=N`` on stderr
when ready and, at SIGTERM, how many posts it answered. It does not verify signatures (the tests
do): it stands for an app that acknowledges at once, so the bench measures relaybox's side.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

from bench.common import LOOPBACK

_count = 0


class _Hook(asyncio.Protocol):
    """HTTP/1.1 requests, possibly several per read: the head up to CRLF CRLF, a Content-Length
    body; each answered 204. A bare protocol (no streams, no per-header reads): the receiver
    stands for an app on another machine, so its own CPU is kept small on the bench's cores."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        global _count
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            at = head.find(b"\r\ncontent-length:")
            try:
                size = int(head[at + 17 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            except ValueError:
                size = -1
            if size < 0:
                assert self.transport is not None
                self.transport.close()
                return
            total = end + 4 + size
            if len(self.buf) < total:
                return
            self.buf = self.buf[total:]
            _count += 1
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Hook, LOOPBACK, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening address={LOOPBACK} port={bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    cpu = time.process_time()
    per = f", {cpu / _count * 1000:.3f} ms of CPU each" if _count else ""
    print(f"webhook receiver: {_count} posts answered{per}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=0)
    asyncio.run(main(p.parse_args().port))
