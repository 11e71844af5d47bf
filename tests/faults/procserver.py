"""`relaybox serve` as a real subprocess, for crash tests: start, find its ports, signal it.

The server logs ``listening address=... port=N mode=...`` on stderr once a listener is bound; every
stderr line is kept (tests check them for leaked secrets and tracebacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from tests import procs

_LISTENING = re.compile(r"listening address=(\S+) port=(\d+) mode=(\w+)")


def relaybox_argv() -> list[str]:
    exe = shutil.which("relaybox")
    if exe is not None:
        return [exe]
    return [sys.executable, "-c", "from admin.cli import main; main()"]


def nofile_argv(nofile: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run with RLIMIT_NOFILE (soft and hard) set to ``nofile``: a small Python wrapper
    sets it and execs, so the limit is the process's own from its first instruction."""
    wrapper = (
        "import os, resource, sys; n = int(sys.argv[1]); "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])"
    )
    return [sys.executable, "-c", wrapper, str(nofile), *argv]


class ServerProcess:
    def __init__(
        self,
        config: Path,
        listeners: int,
        serve_args: Sequence[str] = (),
        *,
        nofile: int | None = None,  # RLIMIT_NOFILE for the server process (fd exhaustion tests)
    ) -> None:
        self.config = config
        self.listeners = listeners
        self.serve_args = list(serve_args)
        self.nofile = nofile
        self.ports: dict[str, int] = {}
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._bound = asyncio.Event()
        self._line = asyncio.Event()

    async def wait_for_line(self, part: str, within: float = 20) -> str:
        """The first stderr line containing ``part``, waiting for it if need be."""
        try:
            async with asyncio.timeout(within):
                while True:
                    for line in self.lines:
                        if part in line:
                            return line
                    self._line.clear()
                    await self._line.wait()
        except TimeoutError:
            code = self.proc.returncode if self.proc else None
            tail = "\n".join(self.lines[-20:])
            raise AssertionError(
                f"no line with {part!r} within {within}s (exit status {code}); last lines:\n{tail}"
            ) from None

    async def start(self, within: float = 30) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
        self.ports, self._bound = {}, asyncio.Event()
        # A process group of its own: with workers = N, SIGKILL of the supervisor alone would
        # orphan its workers (they hold the stderr pipe, so wait() would never return).
        argv = [*relaybox_argv(), "--config", str(self.config), "serve", *self.serve_args]
        if self.nofile is not None:
            argv = nofile_argv(self.nofile, argv)
        self.proc = await procs.spawn(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        self._reader = asyncio.create_task(self._read(self.proc))
        try:
            await asyncio.wait_for(self._bound.wait(), within)
        except TimeoutError:
            raise AssertionError("server did not bind:\n" + "\n".join(self.lines[-30:])) from None

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            raw = await proc.stderr.readline()
            if not raw:
                self._bound.set()  # exited: let start() see it rather than hang
                self._line.set()
                return
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            self._line.set()
            m = _LISTENING.search(line)
            if m:
                self.ports[m.group(3)] = int(m.group(2))
                if len(self.ports) >= self.listeners:
                    self._bound.set()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, within: float = 60) -> int:
        assert self.proc is not None and self._reader is not None
        rc = await asyncio.wait_for(self.proc.wait(), within)
        await asyncio.wait_for(self._reader, 5)
        return rc

    async def ensure_stopped(self) -> None:
        """Teardown: whatever happened, leave no process behind (the whole group)."""
        if self.proc is not None:
            procs.kill_group(self.proc.pid)
            await asyncio.wait_for(self.proc.wait(), 10)
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
