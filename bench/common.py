"""Shared bench plumbing: free loopback ports, an ECDSA certificate, per-process CPU and RSS.

CPU and memory come from /proc (psutil is not a dependency): utime+stime of every process of a
target, plus cutime+cstime so that CPU of children that exited and were reaped still counts.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port that was free a moment ago (bind port 0, read it, close): good enough for a bench."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def make_cert(directory: Path, name: str = "bench.test") -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate (what relaybox generates; half the CPU of RSA-2048)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o644)  # Postfix's smtpd (user postfix) reads it too; a throwaway bench key
    return cert_path, key_path


# --- /proc accounting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    comm: str
    ticks: int  # utime + stime + cutime + cstime


def _read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split at the last ')'.
    head, _, rest = raw.rpartition(")")
    comm = head.partition("(")[2]
    f = rest.split()
    # rest starts at field 3 (state); utime is field 14 -> index 11.
    return ProcStat(pid, int(f[1]), comm, int(f[11]) + int(f[12]) + int(f[13]) + int(f[14]))


def all_procs() -> dict[int, ProcStat]:
    out: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _read_stat(int(entry))
            if st is not None:
                out[st.pid] = st
    return out


def tree(roots: Iterable[int], procs: dict[int, ProcStat] | None = None) -> set[int]:
    """The roots and all their descendants."""
    procs = procs if procs is not None else all_procs()
    children: dict[int, list[int]] = {}
    for st in procs.values():
        children.setdefault(st.ppid, []).append(st.pid)
    seen: set[int] = set()
    todo = [r for r in roots if r in procs]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, ()))
    return seen


def exe_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


PidSelector = Callable[[dict[int, ProcStat]], set[int]]


def tree_selector(*roots: int) -> PidSelector:
    return lambda procs: tree(roots, procs)


class CpuMeter:
    """CPU seconds spent by a set of processes between start() and stop().

    The set is re-evaluated at both ends (Postfix forks smtpd/cleanup on demand): a process seen
    only at the end counts in full, one that vanished counts what its parent reaped (cutime).
    """

    def __init__(self, select: PidSelector) -> None:
        self.select = select
        self._before: dict[int, int] = {}
        self._loop_before: dict[int, int] = {}
        self.loop_s = 0.0  # after stop(): the serving processes' main threads only (see loop_ticks)

    def start(self) -> None:
        procs = all_procs()
        pids = self.select(procs)
        self._before = {pid: procs[pid].ticks for pid in pids}
        self._loop_before = {pid: loop_ticks(pid) for pid in pids}

    def stop(self) -> float:
        procs = all_procs()
        total = loop = 0
        for pid in self.select(procs):
            total += procs[pid].ticks - self._before.get(pid, 0)
            loop += loop_ticks(pid) - self._loop_before.get(pid, 0)
        self.loop_s = max(loop, 0) / CLK_TCK
        return max(total, 0) / CLK_TCK


def loop_ticks(pid: int) -> int:
    """CPU ticks of ``pid``'s main thread (for an asyncio server: its event loop, which holds the
    GIL and bounds the rate), 0 for relaybox's webhook poster and DKIM key processes, which serve
    no SMTP (their CPU is in the target's total)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"webhook-poster" in cmdline or b"relay.signproc" in cmdline:
            return 0
        raw = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    except OSError:
        return 0
    f = raw.rpartition(")")[2].split()
    return int(f[11]) + int(f[12])


def peak_rss_kib(pids: Iterable[int]) -> int:
    """Sum of VmHWM (peak resident set) over the processes, in KiB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def _status_kib(pid: int, path: str, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(pids: Iterable[int]) -> dict[str, float]:
    """A target's memory in MiB. One process: its peak RSS (VmHWM) is the figure. Several
    (Postfix forks a dozen that share their libraries): summing VmHWM would count shared pages
    many times, so the figure is the sum of PSS (proportional set size) right now."""
    pids = list(pids)
    hwm = [_status_kib(p, "status", "VmHWM:") for p in pids]
    pss = sum(_status_kib(p, "smaps_rollup", "Pss:") for p in pids)
    figure = hwm[0] if len(pids) == 1 else pss
    return {
        "mib": round(figure / 1024, 1),
        "kind": "peak RSS" if len(pids) == 1 else "PSS sum",
        "processes": len(pids),
        "max_process_peak_rss_mib": round(max(hwm, default=0) / 1024, 1),
    }


def reset_peak_rss(pids: Iterable[int]) -> None:
    """Reset VmHWM (writing 5 to clear_refs, Linux >= 4.0) so a later peak is this phase's own."""
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            continue


# --- subprocesses ---------------------------------------------------------------------------------


async def wait_for_line(
    stream: asyncio.StreamReader, needle: str, wait_s: float, echo: list[str] | None = None
) -> str:
    """Read lines until one contains needle; keep what was read in echo (for error messages)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {needle!r} within {wait_s}s")
        line_b = await asyncio.wait_for(stream.readline(), left)
        if not line_b:
            raise RuntimeError(f"process exited before {needle!r}")
        line = line_b.decode(errors="replace").rstrip()
        if echo is not None:
            echo.append(line)
        if needle in line:
            return line


async def drain_forever(stream: asyncio.StreamReader, keep: list[str], limit: int = 200) -> None:
    """Keep reading a child's pipe so it never blocks on a full buffer (last `limit` lines kept)."""
    while True:
        line = await stream.readline()
        if not line:
            return
        keep.append(line.decode(errors="replace").rstrip())
        del keep[:-limit]


def write_file(path: Path, text: str) -> None:
    """A small local write (sync on purpose: called between measurements)."""
    path.write_text(text)


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
