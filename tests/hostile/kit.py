"""Small helpers shared by the hostile-input and fault tests (no fixtures: plain functions)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay.clock import ManualClock
from relay.config import Config
from relay.store import spool as spool_mod
from relay.store.spool import MessageInfo
from tests import leaks
from tests.dialogue import Dialogue
from tests.relayserver import RelayHandle, start_relay

LOGIN = "app@example.com"


def message(
    sender: str = LOGIN, to: str = "someone@dest.test", subject: str = "hello", body: bytes = b""
) -> bytes:
    """A small valid message with CRLF line endings, ending in CRLF."""
    head = f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n".encode()
    return head + (body or b"Hello there.\r\n")


async def authed(relay: RelayHandle, password: str, login: str = LOGIN) -> Dialogue:
    """A session on the implicit-TLS listener, EHLO'd and authenticated."""
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.login(login, password)
    return d


async def queued(relay: RelayHandle) -> list[MessageInfo]:
    """Every message in the spool, whatever its state."""
    spool = relay.server.spool
    assert spool is not None
    return await spool.list_messages(spool_mod.STATES)


def with_limits(cfg: Config, **limits: Any) -> Config:
    return dataclasses.replace(cfg, limits=dataclasses.replace(cfg.limits, **limits))


def with_auth(cfg: Config, **auth: Any) -> Config:
    return dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, **auth))


async def started(
    cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> RelayHandle:
    return await start_relay(cfg, tls_files[2], clock)


async def stopped(relay: RelayHandle) -> None:
    await relay.server.shutdown()
    relay.close()


def clean(text: str | bytes, what: str = "output") -> None:
    """Assert no registered secret appears in something a client or operator sees."""
    shown = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    found = leaks.find_in(shown)
    assert not found, f"secret(s) leaked into {what}: {len(found)} item(s)"


async def eventually(pred: Callable[[], bool], within: float = 5.0, what: str = "") -> None:
    """Poll a condition the server reaches on its own (no event to wait on), with a deadline."""
    deadline = time.monotonic() + within
    while not pred():
        assert time.monotonic() < deadline, f"not reached within {within}s: {what}"
        await asyncio.sleep(0.01)  # sleep-ok: polling a condition, bounded by the deadline


def no_errors_logged(records: list[logging.LogRecord]) -> None:
    """Hostile input is answered, never crashes a session: no ERROR record (e.g. "session
    error: TypeError" from handle_exception) was logged."""
    bad = [f"{r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.ERROR]
    assert not bad, bad
