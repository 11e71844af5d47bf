"""The -pg targets' PostgreSQL: a durable cluster of the bench's own on loopback (Debian's
binaries, tests/pgcluster.py; fsync and synchronous commits on, as a production database runs),
one database per target. Its CPU is the database server's, not relaybox's: the per-message CPU
figures of the -pg targets count relaybox's processes only."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import log
from tests.pgcluster import PgServer, bindir, start_server


class BenchPg:
    def __init__(self, server: PgServer) -> None:
        self.server = server

    def new_database(self) -> str:
        return self.server.new_database()

    def store_table(self, dbname: str) -> str:
        """The ``[store]`` table of a relaybox on database ``dbname``."""
        return (
            f'[store]\nurl = "{self.server.url(dbname)}"\n'
            f'password_file = "{self.server.password_file}"\nsslmode = "disable"\n'
        )


async def start_pg(
    work: Path, stops: list[Callable[[], Awaitable[None]]], info: dict[str, Any]
) -> BenchPg | None:
    """The cluster, or None (the -pg targets skipped, and why in ``info``)."""
    try:
        bindir()
    except RuntimeError as exc:
        info["skipped"]["postgresql"] = str(exc)
        log(f"-pg targets skipped: {exc}")
        return None
    root = Path(tempfile.mkdtemp(prefix="relaybox-bench-pg-", dir=None))
    server = await asyncio.to_thread(start_server, root / "cluster", durable=True)

    async def stop() -> None:
        await asyncio.to_thread(server.ctl, "stop", "-m", "fast")
        shutil.rmtree(root, ignore_errors=True)

    stops.append(stop)
    log(f"postgresql: durable cluster on 127.0.0.1:{server.port} ({work.name} run)")
    return BenchPg(server)
