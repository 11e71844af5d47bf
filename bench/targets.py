"""Bench targets as running processes: the ceiling, the counting sink, and the process plumbing.

A target is what the load generator talks to: a port, a login, and the set of processes whose CPU
and memory are the target's cost. Every process is started here on loopback, on a free port, and
stopped by its own pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    PidSelector,
    drain_forever,
    log,
    python_cmd,
    tree_selector,
    wait_for_line,
)

REPO = Path(__file__).resolve().parent.parent
PORT_RE = re.compile(r"listening address=\S+ port=(\d+)")


class Proc:
    """A child process that logs "listening ... port=N" on stderr when it is ready."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self._drain: asyncio.Task[None] | None = None
        self._log_file: Any = None
        self.log_path: Path | None = None

    @classmethod
    async def start(
        cls,
        name: str,
        cmd: list[str],
        *,
        ready: str | None = "listening",
        wait_s: float = 60.0,
        log_path: Path | None = None,
        cwd: Path = REPO,
        **kw: Any,
    ) -> tuple[Proc, str]:
        """Start cmd; wait for a stderr line containing `ready` (None: do not wait).

        With log_path, stderr goes to that file (a busy server's log then costs the bench
        process nothing) and the file is polled for the ready line.
        """
        log_file = _open_log(log_path) if log_path else None
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stderr=log_file if log_file else asyncio.subprocess.PIPE,
            start_new_session=True,
            cwd=cwd,
            **kw,
        )
        self = cls(name, proc)
        self._log_file = log_file
        self.log_path = log_path
        line = ""
        try:
            if ready is not None and log_path is not None:
                line = await _wait_in_file(proc, log_path, ready, wait_s)
            elif ready is not None:
                assert proc.stderr is not None
                line = await wait_for_line(proc.stderr, ready, wait_s, self.lines)
        except (TimeoutError, RuntimeError) as exc:
            await self.stop()
            if log_path is not None:
                self.lines = _read_lines(log_path)
            tail = "\n  ".join(self.lines[-15:])
            raise RuntimeError(f"{name} did not start: {exc}\n  {tail}") from None
        if proc.stderr is not None:
            self._drain = asyncio.create_task(drain_forever(proc.stderr, self.lines))
        return self, line

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self, wait_s: float = 20.0) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), wait_s)
            except TimeoutError:
                log(f"{self.name}: no exit {wait_s}s after SIGTERM; killing pid {self.pid}")
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _open_log(path: Path) -> Any:
    return open(path, "ab")  # noqa: SIM115 - closed in Proc.stop()


def _read_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


async def _wait_in_file(
    proc: asyncio.subprocess.Process, path: Path, needle: str, wait_s: float
) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while loop.time() < deadline:
        for line in _read_lines(path):
            if needle in line:
                return line
        if proc.returncode is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {needle!r}")
        await asyncio.sleep(0.1)  # sleep-ok: polling a log file for the ready line
    raise TimeoutError(f"no {needle!r} within {wait_s}s")


def port_of(line: str) -> int:
    m = PORT_RE.search(line)
    if not m:
        raise RuntimeError(f"no port in {line!r}")
    return int(m.group(1))


@dataclass
class Target:
    """Something the load generator submits to."""

    name: str
    port: int
    user: str
    password_file: Path
    selector: PidSelector
    e2e: bool = False  # rate counted at the sink
    credentials: Path | None = None  # "login password" lines: connection n uses line n % len
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # For a message acknowledged but never received: what the target says about its queue id.
    inspect: Callable[[str], Awaitable[Any]] | None = None


class Sink:
    """The counting sink process, driven over its stdin/stdout (see bench/sink.py)."""

    def __init__(self, proc: Proc, port: int) -> None:
        self.proc, self.port = proc, port
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls) -> Sink:
        proc, line = await Proc.start(
            "sink",
            python_cmd("bench.sink", "--port", "0"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc, port_of(line))

    async def ask(self, command: str) -> dict[str, Any]:
        p = self.proc.proc
        assert p.stdin is not None and p.stdout is not None
        async with self._lock:
            p.stdin.write(command.encode() + b"\n")
            await p.stdin.drain()
            line = await asyncio.wait_for(p.stdout.readline(), 30)
        result: dict[str, Any] = json.loads(line)
        return result

    async def stats(self) -> dict[str, Any]:
        return await self.ask("stats")

    async def reset(self) -> None:
        await self.ask("reset")

    async def dump(self, path: Path) -> list[str]:
        await self.ask(f"dump {path}")
        return _read_lines(path)

    async def stop(self) -> None:
        p = self.proc.proc
        if p.stdin is not None:
            p.stdin.close()
        await self.proc.stop()


class Ceiling:
    """bench/ceiling.py in its own process."""

    def __init__(self, proc: Proc, target: Target) -> None:
        self.proc, self.target = proc, target

    @classmethod
    async def start(cls, cert: Path, key: Path, user: str, password_file: Path) -> Ceiling:
        cmd = python_cmd(
            "bench.ceiling",
            "--port",
            "0",
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--user",
            user,
            "--password-file",
            str(password_file),
        )
        proc, line = await Proc.start("aiosmtpd-ceiling", cmd)
        target = Target(
            "aiosmtpd-ceiling",
            port_of(line),
            user,
            password_file,
            tree_selector(proc.pid),
            notes="bare aiosmtpd, TLS + AUTH PLAIN constant compare, 250 after DATA",
        )
        return cls(proc, target)

    async def stop(self) -> None:
        await self.proc.stop()


async def wait_port(port: int, wait_s: float = 30.0) -> None:
    """Until something accepts on 127.0.0.1:port (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            _r, w = await asyncio.open_connection(LOOPBACK, port)
        except OSError:
            if loop.time() > deadline:
                raise TimeoutError(f"nothing listening on port {port} after {wait_s}s") from None
            await asyncio.sleep(0.1)  # sleep-ok: polling a port owned by another service
            continue
        w.close()
        return
