"""SMTP submission load generator: C connections, STARTTLS + AUTH PLAIN, messages of a given size.

A minimal SMTP client over asyncio streams (it costs about a third of aiosmtplib's client CPU per
message here, see bench/README.md), lock-step like ordinary submission clients (no PIPELINING).
Only a 250 after the final dot counts as sent. Every other reply is counted by stage and code.

    python -m bench.loadgen --port 2587 --user app@bench.test --password-file F -c 8 --duration 5
    python -m bench.loadgen ... --reconnect      # connect, STARTTLS, AUTH, one message, QUIT

The last line on stdout is a JSON summary. With --acked-file, each acknowledged message is written
as "<message-id> <queue-id>" so an end-to-end run can check the sink received every one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

MAX_CONSECUTIVE_FAILURES = 20  # a connection slot gives up after this many sessions in a row fail


class ReplyError(Exception):
    def __init__(self, stage: str, code: int, text: str) -> None:
        super().__init__(f"{stage} {code} {text}")
        self.stage, self.code, self.text = stage, code, text
        self.counted = False


@dataclass
class Stats:
    ok: int = 0
    latencies: list[float] = field(default_factory=list)
    rejects: Counter[str] = field(default_factory=Counter)  # "DATA-END 451", "AUTH 535", ...
    errors: Counter[str] = field(default_factory=Counter)  # connection-level exceptions by type
    acked: list[str] = field(default_factory=list)  # "<message-id> <queue-id>"
    sessions: int = 0


def make_body(size: int, sender: str, rcpt: str) -> tuple[bytes, bytes]:
    """A message of about `size` bytes, split around its Message-ID value.

    Lines are plain ASCII under 78 characters and never start with '.', so no dot-stuffing is needed
    (RFC 5321 4.5.2) and the per-message cost on the client is a bytes join.
    """
    head = (
        f"From: Bench <{sender}>\r\nTo: <{rcpt}>\r\nSubject: relaybox bench\r\n"
        "Date: Thu, 26 Nov 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\nMessage-ID: <"
    ).encode()
    tail = b">\r\n\r\n"
    line = b"The quick brown fox jumps over the lazy dog; relaybox bench filler text 0123.\r\n"
    filler = max(0, size - len(head) - len(tail) - 40)
    body = line * (filler // len(line)) + b"end\r\n"
    return head, tail + body + b".\r\n"


class Client:
    """Just enough SMTP for submission benchmarking."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def connect(cls, host: str, port: int) -> Client:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def reply(self, stage: str, expect: int) -> str:
        lines = []
        while True:
            line = await self.r.readline()
            if not line:
                raise ConnectionError(f"closed during {stage}")
            lines.append(line)
            if line[3:4] != b"-":
                break
        code = int(line[:3])
        if code != expect:
            raise ReplyError(stage, code, b"".join(lines).decode(errors="replace").strip())
        return line[4:].decode(errors="replace").strip()

    async def cmd(self, data: bytes, stage: str, expect: int) -> str:
        self.w.write(data)
        return await self.reply(stage, expect)

    async def hello(self, ctx: ssl.SSLContext | None, auth: bytes | None) -> None:
        await self.reply("GREETING", 220)
        await self.cmd(b"EHLO loadgen.bench.test\r\n", "EHLO", 250)
        if ctx is not None:
            await self.cmd(b"STARTTLS\r\n", "STARTTLS", 220)
            await self.w.start_tls(ctx, server_hostname="bench.test")
            await self.cmd(b"EHLO loadgen.bench.test\r\n", "EHLO", 250)
        if auth is not None:
            await self.cmd(auth, "AUTH", 235)

    async def send(self, mail: bytes, rcpt: bytes, message: bytes) -> str:
        await self.cmd(mail, "MAIL", 250)
        await self.cmd(rcpt, "RCPT", 250)
        await self.cmd(b"DATA\r\n", "DATA", 354)
        return await self.cmd(message, "DATA-END", 250)

    async def quit(self) -> None:
        try:
            await self.cmd(b"QUIT\r\n", "QUIT", 221)
        finally:
            self.w.close()

    def abort(self) -> None:
        self.w.transport.abort()


@dataclass
class Plan:
    host: str
    port: int
    ctx: ssl.SSLContext | None
    auths: list[bytes]  # connection n logs in with auths[n % len(auths)]; empty: no AUTH
    sender: str
    rcpt: str
    head: bytes
    tail: bytes
    reconnect: bool
    deadline: float  # monotonic; stop starting new messages after it
    per_conn: int  # messages per connection (0: until the deadline)
    run_id: str


def queue_id_of(text: str) -> str:
    """'2.0.0 queued as ABC123' -> 'ABC123'; Postfix: 'Ok: queued as ABC123'."""
    marker = "queued as "
    i = text.find(marker)
    return text[i + len(marker) :].split()[0] if i >= 0 else "-"


async def worker(n: int, plan: Plan, stats: Stats) -> None:
    mail = f"MAIL FROM:<{plan.sender}>\r\n".encode()
    rcpt = f"RCPT TO:<{plan.rcpt}>\r\n".encode()
    sent = 0
    failures = 0
    client: Client | None = None

    def more() -> bool:
        if plan.per_conn and sent >= plan.per_conn:
            return False
        return time.monotonic() < plan.deadline

    while more() and failures < MAX_CONSECUTIVE_FAILURES:
        t0 = time.perf_counter()
        try:
            if client is None:
                client = await Client.connect(plan.host, plan.port)
                stats.sessions += 1
                await client.hello(
                    plan.ctx, plan.auths[n % len(plan.auths)] if plan.auths else None
                )
            while more():
                msgid = f"{plan.run_id}.{n}.{sent}@loadgen.bench.test"
                if not plan.reconnect:
                    t0 = time.perf_counter()
                try:
                    text = await client.send(mail, rcpt, plan.head + msgid.encode() + plan.tail)
                except ReplyError as exc:
                    stats.rejects[f"{exc.stage} {exc.code}"] += 1
                    exc.counted = True
                    sent += 1
                    if exc.stage == "DATA-END" or exc.code >= 500:
                        await client.cmd(b"RSET\r\n", "RSET", 250)
                        continue
                    raise
                stats.latencies.append(time.perf_counter() - t0)
                stats.ok += 1
                stats.acked.append(f"<{msgid}> {queue_id_of(text)}")
                sent += 1
                failures = 0
                if plan.reconnect:
                    break
            if plan.reconnect or not more():
                await client.quit()
                client = None
        except ReplyError as exc:
            if not exc.counted:
                stats.rejects[f"{exc.stage} {exc.code}"] += 1
            failures += 1
        except (OSError, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            stats.errors[type(exc).__name__] += 1
            failures += 1
        else:
            continue
        if client is not None:
            client.abort()
            client = None
    if client is not None:
        client.abort()


def percentile(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return 0.0
    k = min(len(sorted_vals) - 1, max(0, round(p / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def client_context() -> ssl.SSLContext:
    """TLS without certificate verification: the same (cheaper) client work against every target."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def auth_plain(login: str, password: str) -> bytes:
    """RFC 4616: authzid (empty) NUL authcid NUL passwd, base64, as an initial response."""
    token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    return f"AUTH PLAIN {token}\r\n".encode()


async def run(
    args: argparse.Namespace, logins: list[tuple[str, str]]
) -> tuple[dict[str, object], list[str]]:
    """The load, then (summary, acknowledged "<message-id> <queue-id>" lines)."""
    sender = args.sender or (logins[0][0] if logins else "bench@bench.test")
    head, tail = make_body(args.size, sender, args.rcpt)
    stats = Stats()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start_wall = time.time()
    t0 = time.monotonic()
    plan = Plan(
        host=args.host,
        port=args.port,
        ctx=None if args.no_tls else client_context(),
        auths=[auth_plain(login, password) for login, password in logins],
        sender=sender,
        rcpt=args.rcpt,
        head=head,
        tail=tail,
        reconnect=args.reconnect,
        deadline=t0 + (args.duration if args.duration else 3600.0),
        per_conn=args.messages,
        run_id=args.run_id or f"{os.getpid()}.{int(start_wall)}",
    )
    await asyncio.gather(*(worker(i, plan, stats) for i in range(args.connections)))
    elapsed = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    lat = sorted(stats.latencies)
    summary = {
        "connections": args.connections,
        "size": args.size,
        "reconnect": args.reconnect,
        "ok": stats.ok,
        "elapsed_s": round(elapsed, 3),
        "start_monotonic": t0,
        "end_monotonic": t0 + elapsed,
        "rate": round(stats.ok / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(lat, 50) * 1000, 2),
        "p95_ms": round(percentile(lat, 95) * 1000, 2),
        "p99_ms": round(percentile(lat, 99) * 1000, 2),
        "max_ms": round(lat[-1] * 1000, 2) if lat else 0.0,
        "rejects": dict(stats.rejects),
        "errors": dict(stats.errors),
        "sessions": stats.sessions,
        "client_cpu_s": round(cpu, 3),
        "client_cpu_ms_per_msg": round(cpu * 1000 / stats.ok, 3) if stats.ok else None,
    }
    return summary, stats.acked


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-c", "--connections", type=int, default=8)
    p.add_argument("-m", "--messages", type=int, default=0, help="per connection (0: by duration)")
    p.add_argument("-d", "--duration", type=float, default=0.0, help="seconds (0: by --messages)")
    p.add_argument("-s", "--size", type=int, default=2048, help="message size in bytes")
    p.add_argument("--user", default="")
    p.add_argument("--password", default="")
    p.add_argument("--password-file", default="")
    p.add_argument(
        "--credentials", default="", help='file of "login password" lines, one per connection'
    )
    p.add_argument("--sender", default="", help="MAIL FROM (default: --user)")
    p.add_argument("--rcpt", default="rcpt@sink.test")
    p.add_argument("--no-tls", action="store_true")
    p.add_argument("--reconnect", action="store_true", help="one message per session")
    p.add_argument("--acked-file", default="")
    p.add_argument("--run-id", default="")
    args = p.parse_args(argv)
    if not args.messages and not args.duration:
        args.messages = 100
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logins: list[tuple[str, str]] = []
    if args.credentials:
        for line in Path(args.credentials).read_text().splitlines():
            login, _, password = line.strip().partition(" ")
            if login:
                logins.append((login, password))
    elif args.user:
        pw = Path(args.password_file).read_text().strip() if args.password_file else args.password
        logins.append((args.user, pw))
    summary, acked = asyncio.run(run(args, logins))
    if args.acked_file:
        Path(args.acked_file).write_text("".join(a + "\n" for a in acked))
    r = summary
    print(
        f"{r['ok']} msgs in {r['elapsed_s']}s = {r['rate']} msgs/s  p50 {r['p50_ms']}ms "
        f"p95 {r['p95_ms']}ms p99 {r['p99_ms']}ms  rejects {r['rejects']} errors {r['errors']} "
        f"client cpu {r['client_cpu_ms_per_msg']} ms/msg",
        file=sys.stderr,
    )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
