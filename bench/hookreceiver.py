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

from bench.common import LOOPBACK

_count = 0


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global _count
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            size = 0
            while True:
                header = await reader.readline()
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _sep, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    size = int(value.strip())
            await reader.readexactly(size)
            _count += 1
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        return
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(_serve, LOOPBACK, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening address={LOOPBACK} port={bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    print(f"webhook receiver: {_count} posts answered", file=sys.stderr, flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=0)
    asyncio.run(main(p.parse_args().port))
