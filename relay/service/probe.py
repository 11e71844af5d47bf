"""The doctor's client: a diagnostic talking to our own listeners, not delivery.

It speaks just enough SMTP to see a listener greet, offer STARTTLS and serve a certificate, reads
the metrics endpoint's status line, and submits one test message (aiosmtplib). It judges nothing:
:mod:`relay.service.doctor` decides what each answer means. Certificates are not verified here
(the doctor judges the one on disk and compares it with the one served).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import aiosmtplib

from relay.config import Listener

PROBE_TIMEOUT = 5.0
EHLO_NAME = "doctor.invalid"


def connect_host(address: str) -> str:
    """Where to reach a listener bound to ``address``: the wildcard addresses via loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address, address)  # noqa: S104


def probe_context() -> ssl.SSLContext:
    """A client context that accepts any certificate: only "does it answer, and with what"."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Connection:
    """One open connection to a listener: read replies, send commands, upgrade to TLS."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def reply(self) -> str:
        """One SMTP reply, its lines joined by newlines; ConnectionError if the peer hangs up."""
        lines = []
        while True:
            raw = await self._reader.readline()
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    async def line(self) -> str:
        """One raw line (an HTTP status line), latin-1, stripped."""
        return (await self._reader.readline()).decode("latin-1").strip()

    def send(self, data: bytes) -> None:
        self._writer.write(data)

    async def command(self, line: str) -> str:
        """Send one SMTP command line and read its reply."""
        self.send(line.encode("ascii") + b"\r\n")
        return await self.reply()

    async def start_tls(self, server_hostname: str) -> None:
        await self._writer.start_tls(probe_context(), server_hostname=server_hostname)

    def peer_certificate(self) -> bytes | None:
        """The certificate served (DER), or None before TLS."""
        ssl_obj = self._writer.get_extra_info("ssl_object")
        if ssl_obj is None:
            return None
        served: bytes | None = ssl_obj.getpeercert(binary_form=True)
        return served


@asynccontextmanager
async def connect(host: str, port: int, *, tls_hostname: str | None) -> AsyncIterator[Connection]:
    """A connection, in TLS from the start when ``tls_hostname`` is given; always closed after."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=probe_context() if tls_hostname is not None else None,
        server_hostname=tls_hostname,
    )  # fmt: skip
    try:
        yield Connection(reader, writer)
    finally:
        # Close and wait for it: a transport left half-closed when the loop ends leaks its socket.
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def doctor_message(sender: str, to: str, hostname: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = "relaybox doctor test"
    msg["Date"] = format_datetime(datetime.datetime.now(datetime.UTC))
    msg["Message-ID"] = make_msgid(domain=hostname)
    msg.set_content(f"A test message sent by `relaybox doctor --send-test` on {time.ctime()}.\n")
    return msg


async def submit(listener: Listener, hostname: str, login: str, password: str, to: str) -> str:
    """Submit a test message from ``login`` to ``to`` through ``listener``; the final reply.

    Raises what aiosmtplib raises: SMTPException (some are OSErrors too), or OSError.
    """
    try:
        _, reply = await aiosmtplib.send(
            doctor_message(login, to, hostname), sender=login, recipients=[to],
            hostname=connect_host(listener.address), port=listener.port,
            username=login, password=password, local_hostname=EHLO_NAME,
            use_tls=listener.mode == "tls", start_tls=listener.mode == "starttls",
            tls_context=probe_context(), timeout=30,
        )  # fmt: skip
    finally:
        # aiosmtplib's close cannot be awaited: give its TLS shutdown a moment to finish before
        # asyncio.run() ends the loop (a half-closed transport leaks its socket).
        await asyncio.sleep(0.05)
    return reply
