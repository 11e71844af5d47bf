"""aiosmtpd-ceiling: bare aiosmtpd 1.4.6 with the same TLS and AUTH PLAIN as relaybox, nothing else.

It is the library's ceiling on this box: STARTTLS with an ECDSA P-256 certificate, AUTH PLAIN
checked by a constant-time compare (no hash, no storage, no policy, no DKIM, no queue), then 250
after DATA. One process, served with loop.create_server on the main loop (no Controller thread),
hostname= passed (else aiosmtpd calls the blocking getfqdn per connection).

    python -m bench.ceiling --port 0 --cert C --key K --user app@bench.test --password-file F

Prints "listening address=127.0.0.1 port=N" on stderr when ready; exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import itertools
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class CeilingHandler:
    def __init__(self) -> None:
        self._ids = itertools.count(1)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return f"250 2.0.0 queued as C{next(self._ids)}"


def make_authenticator(user: bytes, password: bytes) -> Any:
    """A sync authenticator is safe here (aiosmtpd's async one is an AUTH bypass: DESIGN.md)."""

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        if mechanism != "PLAIN" or not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        ok = hmac.compare_digest(data.login, user) & hmac.compare_digest(data.password, password)
        return AuthResult(success=ok, handled=False)

    return authenticator


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


async def serve(args: argparse.Namespace, password: bytes) -> None:
    ctx = server_context(args.cert, args.key)
    handler = CeilingHandler()
    auth = make_authenticator(args.user.encode(), password)
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname="ceiling.bench.test",
            tls_context=ctx,
            require_starttls=True,
            auth_required=True,
            authenticator=auth,
            auth_exclude_mechanism=["LOGIN"],
            loop=loop,
        )

    server = await loop.create_server(factory, args.host, args.port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"listening address={args.host} port={port} mode=starttls", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ceiling")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password-file", required=True)
    args = p.parse_args()
    asyncio.run(serve(args, Path(args.password_file).read_text().strip().encode()))


if __name__ == "__main__":
    main()
