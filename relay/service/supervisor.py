"""``workers = N``: N complete relay processes sharing the listening ports (SO_REUSEPORT).

One Python process tops out near one core (TLS, aiosmtpd, DKIM); the kernel spreads new
connections over sockets bound with SO_REUSEPORT. Each worker is a whole ``relaybox serve``
(``--worker I``): its own listeners, spool file (``spool-I.db``) and deliverer; users and domains
stay in the one shared database. DESIGN.md measured +33-66% on 2 cores this way, where splitting
accept and delivery into processes sharing one spool did not help (write-lock contention).

This process only supervises: it starts the workers with a private NOTIFY_SOCKET, tells systemd
READY=1 once every worker is ready, forwards SIGHUP and SIGTERM, and if a worker dies on its own it
stops the others and exits 1, so systemd's Restart= brings the whole service back.

If the supervisor itself dies (SIGKILL, a crash, outside systemd where no cgroup kill follows),
its workers must not keep the port: each worker holds the read end of a pipe whose only write end
is the supervisor's, and treats end-of-file as SIGTERM (:func:`watch_supervisor`). Portable, no
race with the parent dying before the child installs a parent-death signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from relay.config import Config
from relay.metrics import MULTIPROC_ENV
from relay.service import sdnotify
from relay.store.db import ensure_state_dir

log = logging.getLogger("relaybox.supervisor")

START_TIMEOUT = 120.0
SUPERVISOR_FD_ENV = "RELAYBOX_SUPERVISOR_FD"


WorkerCommand = Callable[[int], Sequence[str]]
"""Given a worker's index, the command line that runs that worker (the caller's entry point)."""


class Supervisor:
    def __init__(self, cfg: Config, worker_command: WorkerCommand) -> None:
        self.cfg = cfg
        self.worker_command = worker_command
        self.procs: list[asyncio.subprocess.Process] = []
        self._stopping = False
        self._ready = False  # every worker said READY=1: a SIGHUP goes on to them
        self._reload_pending = False
        self._hangup_seen: Callable[[], bool] | None = None
        self._metrics_dir = ""  # the workers' prometheus-client files (multiprocess mode)

    async def run(self, *, hangup_seen: Callable[[], bool] | None = None) -> int:
        """Start the workers and watch them until SIGTERM/SIGINT; 0 if all stopped cleanly.

        A SIGHUP before every worker is ready is held (a worker not yet ready may not have its
        handler, and SIGHUP's default action would end it) and forwarded once all are; so is
        one ``hangup_seen`` says came before this loop ran.
        """
        self._hangup_seen = hangup_seen
        with tempfile.TemporaryDirectory(prefix="relaybox-") as tmp:
            path = str(Path(tmp) / "notify")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.bind(path)
            sock.setblocking(False)
            # The lifeline: workers inherit the read end; the write end is ours alone (os.pipe
            # makes both non-inheritable) and closes when this process ends, however it ends.
            lifeline, keep = os.pipe()
            try:
                return await self._run(sock, path, lifeline)
            finally:
                sock.close()
                os.close(keep)
                if self._metrics_dir:
                    shutil.rmtree(self._metrics_dir, ignore_errors=True)

    async def _run(self, sock: socket.socket, path: str, lifeline: int) -> int:
        env = dict(os.environ, NOTIFY_SOCKET=path, **{SUPERVISOR_FD_ENV: str(lifeline)})
        env[MULTIPROC_ENV] = self._metrics_dir = _metrics_dir(self.cfg.state_dir)
        n = self.cfg.workers
        try:
            for i in range(n):
                proc = await asyncio.create_subprocess_exec(
                    *self.worker_command(i),
                    env=env,
                    stdin=subprocess.DEVNULL,
                    pass_fds=(lifeline,),
                )
                self.procs.append(proc)
        finally:
            os.close(lifeline)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload)  # held until all are ready
        exits = [asyncio.create_task(p.wait()) for p in self.procs]
        try:
            await asyncio.wait_for(self._wait_ready(sock, n, exits), START_TIMEOUT)
        except (TimeoutError, _WorkerDied) as exc:
            log.error("workers did not start: %s", exc or "timeout")
            loop.remove_signal_handler(signal.SIGHUP)
            await self._stop_all(exits)
            return 1
        log.info("all %d workers ready", n)
        self._ready = True
        if self._reload_pending or (self._hangup_seen is not None and self._hangup_seen()):
            self._reload_pending = False
            self._forward_reload()
        sdnotify.ready(f"{n} workers listening")
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *exits], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        if stopper in done:
            sdnotify.stopping()
            codes = await self._stop_all(exits)
            return 0 if all(c == 0 for c in codes) else 1
        stopper.cancel()
        dead = [i for i, t in enumerate(exits) if t.done()]
        log.error("worker %s exited on its own: stopping the others", dead)
        await self._stop_all(exits)
        return 1

    async def _wait_ready(
        self, sock: socket.socket, n: int, exits: Sequence[asyncio.Task[int]]
    ) -> None:
        loop = asyncio.get_running_loop()
        ready = 0
        while ready < n:
            recv = asyncio.ensure_future(loop.sock_recv(sock, 4096))
            done, _ = await asyncio.wait([recv, *exits], return_when=asyncio.FIRST_COMPLETED)
            if recv not in done:
                recv.cancel()
                raise _WorkerDied("a worker exited while starting")
            if b"READY=1" in recv.result().split(b"\n"):
                ready += 1

    def _reload(self) -> None:
        if not self._ready:
            self._reload_pending = True
            return
        sdnotify.reloading()
        self._forward_reload()
        sdnotify.ready()

    def _forward_reload(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.send_signal(signal.SIGHUP)

    async def _stop_all(self, exits: Sequence[asyncio.Task[int]]) -> list[int]:
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        # Each worker drains within limits.drain_timeout; give it that and a margin, then kill.
        grace = float(self.cfg.limits.drain_timeout) + 10
        done, pending = await asyncio.wait(exits, timeout=grace)
        for t in pending:
            i = list(exits).index(t)
            with contextlib.suppress(ProcessLookupError):
                self.procs[i].kill()
        await asyncio.gather(*exits, return_exceptions=True)
        return [p.returncode if p.returncode is not None else -9 for p in self.procs]


class _WorkerDied(Exception):
    pass


def watch_supervisor(on_gone: Callable[[], None]) -> bool:
    """In a worker (on its event loop): call ``on_gone`` once the supervisor has exited.

    Reads the lifeline descriptor named in the environment; nothing is ever written to it, so
    readable means end-of-file: the supervisor is gone. Returns False when not started by one.
    """
    raw = os.environ.pop(SUPERVISOR_FD_ENV, None)
    if raw is None:
        return False
    fd = int(raw)
    os.set_inheritable(fd, False)
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            if os.read(fd, 64):
                return  # not ours to write; ignore
        except BlockingIOError:
            return
        except OSError:
            pass
        loop.remove_reader(fd)
        os.close(fd)
        log.warning("supervisor exited: stopping this worker")
        on_gone()

    loop.add_reader(fd, readable)
    return True


def _metrics_dir(state_dir: Path) -> str:
    """A fresh private directory for the workers' metrics files (prometheus-client's
    multiprocess mode: every worker writes its values there, worker 0's endpoint reads them all):
    ``STATE/metrics``, emptied first (a supervisor that was killed left its files), given to the
    state dir's owner, whom the workers become when started as root. A first start creates
    the state dir, as its first worker would have (as the same user: a state dir that did not
    exist gives a root worker nobody else to become)."""
    ensure_state_dir(state_dir)
    path = state_dir / "metrics"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            st = state_dir.stat()
            os.chown(path, st.st_uid, st.st_gid)
    return str(path)
