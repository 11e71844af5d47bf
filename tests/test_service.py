"""`relaybox serve` as systemd runs it: a subprocess with a fake $NOTIFY_SOCKET.

READY=1 arrives only once the listeners answer; SIGHUP swaps the certificate in place (RELOADING=1
then READY=1, same process, open sessions kept, new connections see the new certificate); SIGTERM
sends STOPPING=1, stops accepting, lets a message in DATA finish, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import trustme

from relay import config as config_mod
from tests import procs
from tests.dialogue import Dialogue
from tests.serverconf import serve_config
from tests.test_systemd_unit import sandboxed
from tests.userhelpers import seed_user

ROOT = Path(__file__).resolve().parent.parent
LOGIN = "app@example.com"
CLI = [sys.executable, "-c", "from admin.cli import main; main()"]


class Service:
    """A running `relaybox serve` subprocess, its notify socket and its log lines."""

    def __init__(self, proc: asyncio.subprocess.Process, notify: socket.socket) -> None:
        self.proc = proc
        self.notify = notify
        self.lines: list[str] = []
        self._new_line = asyncio.Condition()
        self._reader = asyncio.create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            async with self._new_line:
                self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))
                self._new_line.notify_all()
        async with self._new_line:
            self._new_line.notify_all()

    async def log(self, pattern: str, within: float = 20) -> re.Match[str]:
        """The first log line matching ``pattern`` (waits for it to be written)."""
        rx = re.compile(pattern)

        def found() -> re.Match[str] | None:
            return next((m for line in self.lines if (m := rx.search(line))), None)

        async with asyncio.timeout(within), self._new_line:
            while (m := found()) is None:
                if self._reader.done():
                    raise AssertionError(f"no log line {pattern!r}:\n" + "\n".join(self.lines))
                await self._new_line.wait()
        return m

    async def notification(self, within: float = 20) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.notify, 4096), within)
        except TimeoutError:
            raise AssertionError("no notification; log:\n" + "\n".join(self.lines)) from None
        return dict(line.split("=", 1) for line in data.decode().split("\n") if line)

    def no_notification_pending(self) -> bool:
        try:
            self.notify.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        return False

    async def port(self, mode: str) -> int:
        m = await self.log(rf"listening address=127\.0\.0\.1 port=(\d+) mode={mode}\b")
        return int(m.group(1))

    async def wait(self, within: float = 30) -> int:
        rc = await asyncio.wait_for(self.proc.wait(), within)
        await self._reader
        return rc

    async def kill(self) -> None:
        procs.kill_group(self.proc.pid)
        await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.contextmanager
def fake_notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """systemd's end of $NOTIFY_SOCKET: a bound datagram socket and its path."""
    # AF_UNIX paths are limited to 107 bytes: a short directory, not pytest's tmp_path.
    with tempfile.TemporaryDirectory(prefix="rbx", dir="/tmp") as d:
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        yield sock, path
        sock.close()


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    with fake_notify_socket() as pair:
        yield pair


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, cert: Path, key: Path) -> bytes:
    """Issue a fresh certificate for relay.test into the files; returns its DER."""
    issued = ca.issue_cert("relay.test", "127.0.0.1")
    for path, blob in ((key, issued.private_key_pem), (cert, issued.cert_chain_pems[0])):
        tmp = path.with_suffix(".new")
        blob.write_to_path(str(tmp))
        tmp.replace(path)  # atomically, as a certificate renewal hook would
    return ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())


def make_box(tmp_path: Path, ca: trustme.CA) -> Path:
    """A config file for the subprocess: ephemeral loopback ports, a CA-issued certificate."""
    write_cert(ca, tmp_path / "cert.pem", tmp_path / "key.pem")
    config = serve_config(
        state=tmp_path / "state",
        cert=tmp_path / "cert.pem",
        key=tmp_path / "key.pem",
        listen=[(0, "starttls"), (0, "tls")],
        limits={"drain_timeout": "20s"},
        delivery={"paused": True},
    )
    (tmp_path / "relaybox.toml").write_text(config)
    return tmp_path


@pytest.fixture
def box(tmp_path: Path, ca: trustme.CA) -> Path:
    return make_box(tmp_path, ca)


async def add_user(box: Path) -> str:
    """A verified domain and a user, written to the state dir before the service starts."""
    cfg = config_mod.load(box / "relaybox.toml")
    cfg.state_dir.mkdir(mode=0o700, exist_ok=True)
    return await seed_user(cfg, LOGIN, now=time.time())


@contextlib.asynccontextmanager
async def service(
    box: Path,
    notify_path: str,
    notify: socket.socket,
    prefix: Sequence[str] = (),
    env_extra: dict[str, str] | None = None,
) -> AsyncIterator[Service]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "RELAYBOX_CONFIG")}
    env["NOTIFY_SOCKET"] = notify_path
    env.update(env_extra or {})
    proc = await procs.spawn(
        *prefix, *CLI, "--config", str(box / "relaybox.toml"), "serve",
        cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    svc = Service(proc, notify)
    try:
        yield svc
    finally:
        await svc.kill()


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def peer_cert(d: Dialogue) -> bytes:
    obj = d.writer.get_extra_info("ssl_object")
    assert obj is not None
    der = obj.getpeercert(binary_form=True)
    assert der is not None
    return bytes(der)


async def test_ready_reload_and_drain(
    box: Path, ca: trustme.CA, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    password = await add_user(box)
    ctx = client_context(ca)
    first_cert = ssl.PEM_cert_to_DER_cert((box / "cert.pem").read_text())

    async with service(box, path, sock) as svc:
        # READY=1: at that moment both listeners answer with their greeting.
        ready = await svc.notification()
        assert ready.get("READY") == "1", ready
        starttls_port, tls_port = await svc.port("starttls"), await svc.port("tls")
        plain = await Dialogue.open(starttls_port)
        idle = await Dialogue.open(tls_port, tls=ctx)
        assert peer_cert(idle) == first_cert
        await idle.expect_after("EHLO client.test", "250")

        # SIGHUP: a new certificate without a restart.
        new_cert = write_cert(ca, box / "cert.pem", box / "key.pem")
        assert new_cert != first_cert
        svc.proc.send_signal(signal.SIGHUP)
        reloading = await svc.notification()
        assert reloading["RELOADING"] == "1"
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < now_usec - int(reloading["MONOTONIC_USEC"]) < 60_000_000
        assert (await svc.notification()).get("READY") == "1"
        fresh = await Dialogue.open(tls_port, tls=ctx)
        assert peer_cert(fresh) == new_cert
        await fresh.expect_after("QUIT", "221")
        await fresh.close()
        upgraded = await Dialogue.open(starttls_port)
        await upgraded.expect_after("EHLO client.test", "250")
        await upgraded.starttls(ctx)
        assert peer_cert(upgraded) == new_cert
        await upgraded.expect_after("QUIT", "221")
        await upgraded.close()
        # The sessions opened before the reload are still served by the same process.
        await idle.expect_after("NOOP", "250")
        await plain.expect_after("NOOP", "250")
        assert svc.proc.returncode is None

        # A message in the middle of DATA when SIGTERM comes.
        busy = await Dialogue.open(tls_port, tls=ctx)
        await busy.login(LOGIN, password)
        await busy.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
        await busy.expect_after("RCPT TO:<someone@dest.test>", "250")
        await busy.expect_after("DATA", "354")
        busy.send(f"From: {LOGIN}\r\nTo: someone@dest.test\r\nSubject: drain\r\n\r\nfirst half")
        await busy.writer.drain()

        svc.proc.send_signal(signal.SIGTERM)
        stopping = await svc.notification()
        assert stopping.get("STOPPING") == "1", stopping
        assert stopping.get("STATUS", "").startswith("draining "), stopping
        # The drain may outlast TimeoutStopSec: systemd is asked for drain_timeout + a margin.
        extend = await svc.notification()
        assert int(extend["EXTEND_TIMEOUT_USEC"]) > 15_000_000, extend
        # Idle sessions are told at once; by then the listeners are closed.
        await idle.expect("421 4.3.2")
        await plain.expect("421 4.3.2")
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", tls_port)
        # The message in DATA still completes, and is committed before the 250.
        busy.send("second half\r\n.")
        await busy.writer.drain()
        await busy.expect("250 2.0.0")
        # Then the session ends: 221 to our QUIT, or the server's own 421 when it got there first.
        assert (await busy.reply_after("QUIT"))[:3] in ("221", "421")
        await busy.close()
        for d in (idle, plain):
            await d.close()

        assert await svc.wait() == 0, "\n".join(svc.lines)
        await svc.log(r"\bstopped\b")
        assert svc.no_notification_pending()


async def test_no_ready_when_a_listener_cannot_bind(
    box: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        conf = box / "relaybox.toml"
        conf.write_text(conf.read_text().replace("port = 0", f"port = {port}", 1))
        async with service(box, path, sock) as svc:
            await svc.log("cannot start: .*address already in use")
            assert svc.no_notification_pending()
            assert await svc.wait(within=5) == 1


async def test_serves_under_the_units_sandbox(
    box: Path, ca: trustme.CA, notify_socket: tuple[socket.socket, str]
) -> None:
    """MemoryDenyWriteExecute= and SystemCallFilter= applied for real (see test_systemd_unit):
    argon2 in threads, DKIM signing, TLS, SQLite and the notify socket all keep working."""
    sock, path = notify_socket
    prefix = sandboxed(box, [])
    password = await add_user(box)
    async with service(box, path, sock, prefix) as svc:
        ready = await svc.notification()
        assert ready.get("READY") == "1", svc.lines
        status = await asyncio.to_thread(Path(f"/proc/{svc.proc.pid}/status").read_text)
        assert re.search(r"^Seccomp:\s+2$", status, re.M), "no seccomp filter on the service"
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        d = await Dialogue.open(await svc.port("tls"), tls=client_context(ca))
        await d.login(LOGIN, password)
        await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
        await d.expect_after("RCPT TO:<someone@dest.test>", "250")
        await d.expect_after("DATA", "354")
        await d.expect_after(f"From: {LOGIN}\r\nSubject: s\r\n\r\nsandboxed\r\n.", "250")
        await d.expect_after("QUIT", "221")
        await d.close()
        svc.proc.send_signal(signal.SIGTERM)
        assert await svc.wait() == 0, "\n".join(svc.lines)
        assert not [line for line in svc.lines if "Traceback" in line or "ERROR" in line]


def test_gc_settle_freezes_startup_and_collects_the_young_less_often() -> None:
    """relay/service/gctune.py, in a process of its own (it changes the collector for good):
    startup's objects frozen, the youngest generation's threshold raised, the others kept."""
    code = (
        "import gc; from relay.service import gctune; before = gc.get_threshold(); "
        "gctune.settle(); after = gc.get_threshold(); "
        "print(gc.get_freeze_count() > 1000, after[0] == gctune.YOUNG, after[1:] == before[1:])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["True", "True", "True"], out
