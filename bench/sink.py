"""Counting SMTP sink: plain aiosmtpd (no TLS, no AUTH) recording the Message-ID of each message.

The upstream for relaybox-e2e and postfix-e2e. It is driven over stdin, one command a line, and
answers one JSON line on stdout:

    stats          -> {"received": N, "unique": U, "duplicates": D, "first": t, "last": t}
    dump PATH      -> writes every received Message-ID (once per receipt) to PATH; {"dumped": N}
    reset          -> forgets everything; {"reset": true}

Times are time.monotonic() (CLOCK_MONOTONIC: comparable across processes on one box).
Prints "listening address=127.0.0.1 port=N" on stderr when ready; exits at EOF on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

MSGID_RE = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


class SinkHandler:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.ids: Counter[bytes] = Counter()
        self.received = 0
        self.first = 0.0
        self.last = 0.0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data: bytes = envelope.original_content or envelope.content
        # Headers only: the first empty line ends them (RFC 5322 2.1).
        end = data.find(b"\r\n\r\n")
        m = MSGID_RE.search(data, 0, end if end >= 0 else len(data))
        n = max(1, len(envelope.rcpt_tos))
        self.ids[m.group(1) if m else b"<none>"] += n
        now = time.monotonic()
        if not self.received:
            self.first = now
        self.received += n
        self.last = now
        return "250 2.0.0 OK"

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "unique": len(self.ids),
            "duplicates": sum(c - 1 for c in self.ids.values() if c > 1),
            "first": self.first,
            "last": self.last,
        }


def dump(ids: Counter[bytes], path: Path) -> int:
    """One line per receipt (a duplicate appears twice)."""
    lines = [mid.decode(errors="replace") for mid, c in ids.items() for _ in range(c)]
    path.write_text("".join(x + "\n" for x in lines))
    return len(lines)


async def control(handler: SinkHandler) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while raw := await reader.readline():  # ends at EOF: the harness closed our stdin
        cmd, _, arg = raw.decode().strip().partition(" ")
        if not cmd:
            continue
        out: dict[str, Any]
        if cmd == "stats":
            out = handler.stats()
        elif cmd == "dump":
            out = {"dumped": dump(handler.ids, Path(arg))}
        elif cmd == "reset":
            handler.reset()
            out = {"reset": True}
        else:
            out = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(out), flush=True)


async def serve(args: argparse.Namespace) -> None:
    handler = SinkHandler()
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname="sink.bench.test",
            data_size_limit=64 * 1024 * 1024,
            auth_require_tls=False,
            loop=loop,
        )

    server = await loop.create_server(factory, args.host, args.port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"listening address={args.host} port={port} mode=plain", file=sys.stderr, flush=True)
    await control(handler)
    server.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sink")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
