"""What one large DATA costs everyone else: another session's NOOP latency while a client sends a
message of empty lines, and the server CPU that message takes (issue 12, item 3).

    python -m bench.datalatency                  # 8 MiB of empty lines, relaybox from this checkout
    python -m bench.datalatency --size-mib 16
    python -m bench.datalatency --code DIR       # relaybox from another checkout (the old code)
    python -m bench.datalatency --refused        # the DATA reader alone (see below)

One `relaybox serve` (delivery paused), set up like bench/relaybox_target.py: the real CLI, a
domain verified on a loopback DNS zone, one user. A pinger session sends NOOP every 2 ms and times
each reply, first with nothing else going on ("idle"), then while another client, a process of its
own (its CPU does not slow the pinger), sends one authenticated message of empty lines, from its
first octet to the reply (the server reads DATA, then completes, signs and stores the message).
With --refused the message ends in a line holding a NUL: the server reads all of it and refuses it
(554 5.6.0), so what is measured is the DATA reader alone, without signing or storing.
The server's CPU is counted from the first octet of that message to its reply (the pinger's NOOPs
included, and its new session every NOOPS_PER_SESSION: a few ms of CPU a second). Takes well
under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import smtplib
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import CpuMeter, free_port, log, make_cert, tree_selector
from bench.dnszone import Zone
from bench.relaybox_target import Relaybox

REPO = Path(__file__).resolve().parent.parent
PING_EVERY = 0.002  # seconds between NOOPs
# A session may send only so many commands without a message (limits.max_idle_commands, 100 by
# default): the pinger starts a new one after this many NOOPs (not timed).
NOOPS_PER_SESSION = 90
IDLE_SECONDS = 2.0


class Pinger:
    """STARTTLS sessions that time NOOPs."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.port, self.ctx = port, ctx
        self.sent = 0

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        await self.reply()
        await self.command(b"EHLO pinger")
        await self.command(b"STARTTLS")
        await self.writer.start_tls(self.ctx, server_hostname="bench.test")
        await self.command(b"EHLO pinger")
        self.sent = 0

    async def reply(self) -> str:
        while True:
            line = (await self.reader.readline()).decode()
            if not line:
                raise ConnectionError("the server closed the pinger's session")
            if line[3:4] != "-":
                return line.strip()

    async def command(self, line: bytes) -> str:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def ping(self, until: asyncio.Future[bytes] | float) -> list[tuple[float, float]]:
        """(loop time sent, round trip in ms) of NOOPs, one every PING_EVERY, until the future
        is done or the loop time ``until`` is reached."""
        loop = asyncio.get_running_loop()
        out: list[tuple[float, float]] = []
        while not (until.done() if isinstance(until, asyncio.Future) else loop.time() >= until):
            if self.sent == NOOPS_PER_SESSION:
                await self.close()
                await self.open()
            self.sent += 1
            sent_at, start = loop.time(), time.perf_counter()
            reply = await self.command(b"NOOP")
            out.append((sent_at, (time.perf_counter() - start) * 1000))
            assert reply.startswith("250"), reply
            await asyncio.sleep(PING_EVERY)
        return out

    async def close(self) -> None:
        await self.command(b"QUIT")
        self.writer.close()


def figures(ms: list[float]) -> str:
    if len(ms) < 2:
        return f"{len(ms)} NOOP(s) " + " ".join(f"{m:.1f} ms" for m in ms)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return f"p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms, max {max(ms):.1f} ms ({len(ms)} NOOPs)"


async def run(size_mib: int, code: Path | None, refused: bool) -> dict[str, object]:
    if code is not None:  # the CLI and the server, not this process, run the other checkout
        os.environ["PYTHONPATH"] = str(code)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    with tempfile.TemporaryDirectory(prefix="relaybox-datalatency-") as tmp:
        work = Path(tmp)
        cert, key = make_cert(work / "tls")
        zone = Zone()
        zone.start()
        rb = await Relaybox.start(
            "relaybox", work / "relaybox", cert=cert, key=key, zone=zone,
            sink_port=free_port(), paused=True,
        )  # fmt: skip
        try:
            return await measure(rb, cert, size_mib, refused)
        finally:
            await rb.stop()
            zone.stop()


async def measure(rb: Relaybox, cert: Path, size_mib: int, refused: bool) -> dict[str, object]:
    ctx = ssl.create_default_context(cafile=str(cert))
    pinger = Pinger(rb.target.port, ctx)
    await pinger.open()
    loop = asyncio.get_running_loop()
    idle = await pinger.ping(loop.time() + IDLE_SECONDS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # this checkout's bench
    sender = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.datalatency", "--send", str(rb.target.port), str(cert),
        rb.target.user, str(size_mib), "refused" if refused else "accepted",
        cwd=REPO, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdin, stdout = sender.stdin, sender.stdout
    assert stdin is not None and stdout is not None
    stdin.write(rb.target.password_file.read_bytes().strip() + b"\n")
    await stdin.drain()
    ready = await stdout.readline()
    assert ready.strip() == b"ready", ready  # DATA answered 354: the message comes next
    meter = CpuMeter(tree_selector(rb.proc.pid))
    meter.start()
    stdin.write(b"go\n")
    await stdin.drain()
    done = asyncio.ensure_future(stdout.readline())
    during = await pinger.ping(done)
    cpu = meter.stop()
    result = json.loads(await done)
    await sender.wait()
    await pinger.close()
    return {
        "size_mib": size_mib,
        "reply": result["reply"],
        "reply_seconds": result["seconds"],
        "server_cpu_seconds": round(cpu, 2),
        "idle": [ms for _, ms in idle],
        "during": [ms for _, ms in during],
    }


def send(port: int, cafile: str, login: str, size_mib: int, refused: bool) -> None:
    """The sender process: log in, DATA, say "ready"; on "go" send the message, print the reply."""
    password = sys.stdin.readline().rstrip("\n")
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False  # the bench certificate names bench.test; we dial 127.0.0.1
    head = f"From: {login}\r\nTo: someone@dest.test\r\nSubject: empty lines\r\n\r\n".encode()
    data = (
        head + b"\r\n" * (size_mib * 1024 * 1024 // 2) + (b"\0\r\n" if refused else b"") + b".\r\n"
    )
    with smtplib.SMTP("127.0.0.1", port, timeout=600) as s:
        s.ehlo("sender")
        s.starttls(context=ctx)
        s.ehlo("sender")
        s.login(login, password)
        s.mail(login)
        s.rcpt("someone@dest.test")
        code, _ = s.docmd("DATA")
        assert code == 354, code
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.perf_counter()
        assert s.sock is not None
        s.sock.sendall(data)
        code, text = s.getreply()
        seconds = time.perf_counter() - start
    out = {"reply": f"{code} {text.decode()}", "seconds": round(seconds, 2)}
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.datalatency", description=__doc__)
    ap.add_argument("--size-mib", type=int, default=8, help="MiB of empty lines (default 8)")
    ap.add_argument("--code", type=Path, help="run relaybox from this checkout instead")
    ap.add_argument("--refused", action="store_true", help="end with a NUL: the reader alone")
    ap.add_argument("--json-out", type=Path, help="also write the samples as JSON")
    ap.add_argument(
        "--send", nargs=5, metavar=("PORT", "CAFILE", "LOGIN", "MIB", "END"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.send:
        port, cafile, login, mib, end = args.send
        send(int(port), cafile, login, int(mib), end == "refused")
        return
    code = args.code.resolve() if args.code else None
    r = asyncio.run(run(args.size_mib, code, args.refused))
    print(f"relaybox from {code or REPO}")
    nul = ", then a NUL" if args.refused else ""
    print(f"  message: {r['size_mib']} MiB of empty lines{nul} -> {r['reply']}")
    print(f"  server CPU for the message: {r['server_cpu_seconds']:.2f} s"
          f" (sent and answered in {r['reply_seconds']:.2f} s)")  # fmt: skip
    idle, during = r["idle"], r["during"]
    assert isinstance(idle, list) and isinstance(during, list)
    print(f"  another session's NOOP, idle:        {figures(idle)}")
    print(f"  another session's NOOP, during DATA: {figures(during)}")
    if args.json_out:
        args.json_out.write_text(json.dumps(r, indent=1))
    log("done")


if __name__ == "__main__":
    main()
