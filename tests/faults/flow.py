"""Helpers for fault tests that go through delivery: config, submit, wait, inspect."""

from __future__ import annotations

import dataclasses

from relay.config import Config
from relay.config_sections import SmarthostConfig
from relay.units import Duration
from tests.dialogue import Dialogue
from tests.hostile.kit import LOGIN, authed, message
from tests.relayserver import RelayHandle
from tests.sink import Sink


def delivering(cfg: Config, port: int) -> Config:
    """Deliver (not paused) to a plain smarthost on loopback, with 1-second timeouts."""
    d = dataclasses.replace(
        cfg.delivery,
        paused=False,
        mode="smarthost",
        smarthost=SmarthostConfig(host="127.0.0.1", port=port, security="none"),
        connect_timeout=Duration(1),
        command_timeout=Duration(1),
    )
    return dataclasses.replace(cfg, delivery=d)


async def submit(relay: RelayHandle, password: str, tag: str) -> str:
    d: Dialogue = await authed(relay, password)
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
    await d.expect_after("RCPT TO:<bob@dest.test>", "250")
    await d.expect_after("DATA", "354")
    d.send_raw(message(subject=tag) + b".\r\n")
    reply = await d.reply()
    assert reply.startswith("250 2.0.0 queued as "), reply
    await d.close()
    return reply.rsplit(" ", 1)[1]


async def state_of(relay: RelayHandle, msg_id: str) -> tuple[str, str]:
    spool = relay.server.spool
    assert spool is not None
    (r,) = (await spool.show(msg_id)).recipients
    return r.state, r.last_reply or ""


async def idle(relay: RelayHandle) -> None:
    relay.server.deliverer.wake()
    await relay.server.deliverer.wait_idle(15)


def copies(sink: Sink, tag: str) -> int:
    return sum(1 for r in sink.received if f"Subject: {tag}\r\n".encode() in r.data)
