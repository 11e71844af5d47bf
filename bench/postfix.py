"""postfix-e2e targets: Debian's Postfix (+ Cyrus SASL, + OpenDKIM RSA-2048) relaying to the sink.

bench/setup-peers.sh installs and configures the static part. Here, at bench time: two submission
services on free loopback ports (one with the OpenDKIM milter, one without), relayhost pointed at
the sink, OpenDKIM started as our child on a free port, then `postfix start`. Stopped and the two
services removed again at the end. CPU counted: Postfix's master and all its children (smtpd,
cleanup, qmgr, smtp, ...) plus OpenDKIM.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

from bench.common import LOOPBACK, ProcStat, free_port, log, tree
from bench.targets import Proc, Target, wait_port

STATE = Path("/var/lib/relaybox-bench")
MASTER_PID = Path("/var/spool/postfix/pid/master.pid")
USER = "app@bench.test"


def available() -> str | None:
    """None if the peers are set up, else why not (shown in the report)."""
    if not shutil.which("postfix") or not shutil.which("opendkim"):
        return "postfix/opendkim not installed (run bench/setup-peers.sh as root)"
    if not (STATE / "ready").exists():
        return "peers not configured (run bench/setup-peers.sh as root)"
    return None


def _run(*cmd: str) -> str:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    return out.stdout


def _master_pid() -> int | None:
    try:
        return int(MASTER_PID.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _running() -> bool:
    return subprocess.run(["postfix", "status"], capture_output=True, timeout=30).returncode == 0


def _remove_bench_services() -> None:
    for line in _run("postconf", "-M").splitlines():
        name = line.split(maxsplit=1)[0] if line.strip() else ""
        if name.startswith(f"{LOOPBACK}:"):
            _run("postconf", "-MX", f"{name}/inet")


OPENDKIM_CONF = """\
Syslog no
Mode s
Domain bench.test
Selector bench
KeyFile {key}
Socket local:{socket}
UMask 000
Canonicalization relaxed/relaxed
SignatureAlgorithm rsa-sha256
UserID opendkim
RequireSafeKeys false
"""


async def _wait_socket(path: Path, wait_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            _r, w = await asyncio.open_unix_connection(str(path))
        except OSError:
            if loop.time() > deadline:
                raise TimeoutError(f"opendkim: no socket at {path} after {wait_s}s") from None
            await asyncio.sleep(0.1)  # sleep-ok: polling a socket owned by another process
            continue
        w.close()
        return


class PostfixPeer:
    """One Postfix with two submission services, and one OpenDKIM."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.opendkim: Proc | None = None
        self.started_postfix = False
        self.targets: list[Target] = []

    async def start(self, sink_port: int) -> list[Target]:
        if _running():
            raise RuntimeError("postfix is already running; stop it first (postfix stop)")
        plain, signed = free_port(), free_port()
        # A unix socket, as Debian sets it up: over loopback TCP the milter's small writes meet
        # Nagle + delayed ACK (~40 ms stalls per message). The directory must be reachable by the
        # postfix user (our temp dir is not).
        rundir = STATE / "run"
        rundir.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(rundir, "opendkim", "opendkim")  # it binds after dropping to UserID
        sock = rundir / "opendkim.sock"
        sock.unlink(missing_ok=True)
        conf = self.workdir / "opendkim.conf"
        conf.write_text(OPENDKIM_CONF.format(key=STATE / "dkim.private", socket=sock))
        # -f: foreground, so it stays our child (pid known, stopped by pid).
        self.opendkim, _ = await Proc.start(
            "opendkim", ["opendkim", "-f", "-x", str(conf)], ready=None
        )
        _remove_bench_services()
        _run("postconf", "-e", f"relayhost = [{LOOPBACK}]:{sink_port}", "smtpd_milters =")
        smtpd = "inet n - n - - smtpd"
        _run("postconf", "-M", f"{LOOPBACK}:{plain}/inet={LOOPBACK}:{plain} {smtpd}")
        _run(
            "postconf",
            "-M",
            f"{LOOPBACK}:{signed}/inet={LOOPBACK}:{signed} {smtpd} -o smtpd_milters=unix:{sock}",
        )
        _run("postfix", "check")
        _run("postfix", "start")
        self.started_postfix = True
        await wait_port(plain)
        await wait_port(signed)
        await _wait_socket(sock)
        password_file = STATE / "postfix-password"
        self.targets = [
            Target(
                "postfix-e2e",
                plain,
                USER,
                password_file,
                self.selector,
                e2e=True,
                notes="Postfix + Cyrus sasldb, no DKIM",
            ),
            Target(
                "postfix-dkim-e2e",
                signed,
                USER,
                password_file,
                self.selector,
                e2e=True,
                notes="Postfix + Cyrus sasldb + OpenDKIM milter RSA-2048",
            ),
        ]
        log(f"postfix: submission {plain} (no DKIM), {signed} (OpenDKIM on {sock})")
        return self.targets

    def selector(self, procs: dict[int, ProcStat]) -> set[int]:
        roots = [p for p in (_master_pid(), self.opendkim.pid if self.opendkim else None) if p]
        return tree(roots, procs)

    async def queue_empty(self) -> bool:
        out = await asyncio.to_thread(_run, "postqueue", "-j")
        return not out.strip()

    async def stop(self) -> None:
        if self.started_postfix:
            await asyncio.to_thread(_run, "postfix", "stop")
            self.started_postfix = False
        await asyncio.to_thread(_remove_bench_services)
        if self.opendkim is not None:
            await self.opendkim.stop()
            self.opendkim = None
