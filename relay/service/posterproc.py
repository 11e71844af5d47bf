"""The poster process: a worker's webhook posts, out of the worker's event loop (issue 16).

``relaybox serve`` starts one per worker (relay/service/webhooks.py, :class:`PosterProcess`). The
worker writes the events (in the transactions of the changes they report, as before); this
process reads its spool files' outboxes, posts, and records the outcomes in transactions of its
own on the same files (relay/store/outbox.py, :class:`OutboxFile`). An HTTP exchange costs more
CPU than anything else an event needs, and a worker's loop is the one that serves SMTP: here it
runs on a core of its own, and a slow or hostile receiver costs the SMTP sessions nothing.

The pipe protocol, one line each way per message, JSON after a keyword:

- parent to child (stdin): ``init {"config": ..., "spools": [paths]}`` first, then
  ``endpoints [[id, url, domain, events, secret, created_at], ...]`` (at start, at every
  refresh and SIGHUP: the worker reads them; this process opens no other database),
  ``config {...}`` (a reload), ``wake`` (events were written). End of file: the worker is gone
  or stopping: posts in flight get ``[limits] drain_timeout`` (at most 10 s), the rest stays
  pending for the next start (at least once).
- child to parent (stdout): ``ready {}``, ``events [[type, outcome, n], ...]`` and
  ``backlog [spool, pending, oldest_age]``, which the worker adds to its metrics.

The mail log ("webhook failed ...") goes to stderr, which is the worker's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import IO, Any

from relay import config as config_mod
from relay.config import Config
from relay.delivery.poster import Poster
from relay.store.db import StoreError
from relay.store.outbox import OutboxFile
from relay.store.webhooks import Endpoint, Subscriptions

log = logging.getLogger("relaybox.webhooks")

LINE_LIMIT = 64 * 1024 * 1024  # a config or an endpoint list is far smaller
FLUSH_DELAY = 0.1  # seconds the counts of posts gather before they go to the worker
# Seconds events (and finished posts) gather before the outbox is read (and written): here, away
# from SMTP, latency matters less than the CPU per event (one read and one write per burst).
COALESCE = 0.1


def encode_endpoints(endpoints: tuple[Endpoint, ...]) -> bytes:
    rows = [[e.id, e.url, e.domain, list(e.events), e.secret, e.created_at] for e in endpoints]
    return b"endpoints " + json.dumps(rows).encode() + b"\n"


def decode_endpoints(data: Any) -> list[Endpoint]:
    return [Endpoint(str(r[0]), str(r[1]), r[2], tuple(r[3]), str(r[4]), float(r[5])) for r in data]


def encode_config_data(cfg: Config) -> dict[str, Any]:
    return config_mod.to_dict(cfg, redact=False)


def encode_config(cfg: Config) -> str:
    return json.dumps(encode_config_data(cfg))


def json_line(data: Any) -> bytes:
    return json.dumps(data).encode() + b"\n"


class _Report:
    """The posters' metrics, sent to the worker as lines (counts gathered FLUSH_DELAY)."""

    def __init__(self, out: asyncio.WriteTransport) -> None:
        self._out = out
        self._counts: dict[tuple[str, str], int] = {}
        self._flush: asyncio.TimerHandle | None = None

    def send(self, kind: str, data: Any) -> None:
        if not self._out.is_closing():  # the worker is gone: we stop anyway
            self._out.write(f"{kind} {json.dumps(data)}\n".encode())

    def webhook_event(self, event_type: str, outcome: str) -> None:
        key = (event_type, outcome)
        self._counts[key] = self._counts.get(key, 0) + 1
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)

    def set_webhook_backlog(self, spool: str, pending: int, oldest_age: float) -> None:
        self.send("backlog", [spool, pending, oldest_age])

    def flush(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._counts:
            counts, self._counts = self._counts, {}
            self.send("events", [[t, o, n] for (t, o), n in counts.items()])


async def run(stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None) -> int:
    """The child's whole life: 0 once its parent closed the pipe and the posters stopped."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), stdin or sys.stdin.buffer
    )
    out, _protocol = await loop.connect_write_pipe(asyncio.Protocol, stdout or sys.stdout.buffer)
    report = _Report(out)
    kind, data = parse(await reader.readline())
    if kind != "init":
        log.error("webhook poster: expected init from the worker, got %r", kind[:20])
        return 1
    cfg = config_mod.from_dict(data["config"], source="(the worker's)")
    subs = Subscriptions()
    files: list[OutboxFile] = []
    posters: list[Poster] = []
    try:
        for path in data["spools"]:
            outbox = await OutboxFile.open(Path(path))
            files.append(outbox)
            poster = Poster(
                outbox, subs, cfg, name=Path(path).stem, metrics=report, coalesce=COALESCE
            )
            posters.append(poster)
        for poster in posters:
            poster.start()
        report.send("ready", {})
        while True:
            line = await reader.readline()
            if not line:
                break
            kind, data = parse(line)
            if kind == "endpoints":
                subs.set(decode_endpoints(data))
            elif kind == "config":
                cfg = config_mod.from_dict(data, source="(the worker's)")
                for poster in posters:
                    poster.configure(cfg)
            elif kind != "wake":
                log.warning("webhook poster: unknown line from the worker: %r", kind[:20])
                continue
            for poster in posters:
                poster.wake()
    except StoreError as exc:
        log.error("webhook poster: %s", exc)
        return 1
    finally:
        drain = min(10.0, float(cfg.limits.drain_timeout))
        for poster in posters:
            await poster.stop(timeout=drain)
        report.flush()
        for outbox in files:
            await outbox.close()
        out.close()
    return 0


def parse(line: bytes) -> tuple[str, Any]:
    kind, _sep, rest = line.strip().partition(b" ")
    try:
        return kind.decode("ascii", "replace"), (json.loads(rest) if rest else None)
    except ValueError:
        return "invalid", None
