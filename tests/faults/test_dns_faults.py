"""The DNS server down (no answer) or answering SERVFAIL, through the whole relay (issue 6,
item 4): a domain's state changes only on definite answers, and delivery in MX mode is deferred,
then done once DNS answers again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from relay.clock import ManualClock
from relay.config import Config
from relay.delivery.scheduler import BACKOFF
from relay.store import domains
from relay.units import Duration
from tests.dnsserver import TestDNSServer
from tests.faults.flow import copies, idle, state_of, submit
from tests.hostile.kit import LOGIN, started, stopped
from tests.relayserver import RelayHandle
from tests.sink import SinkFactory

DOMAIN = "example.com"


@pytest.fixture
async def dns_relay(
    relay_cfg: Config,
    dns_cfg: Config,
    tls_files: tuple[Path, Path, Path],
    clock: ManualClock,
) -> RelayHandle:
    """The relay resolving through the loopback DNS server (delivery paused)."""
    relay = await started(dataclasses.replace(relay_cfg, dns=dns_cfg.dns), tls_files, clock)
    yield relay  # type: ignore[misc]
    await stopped(relay)


async def state(relay: RelayHandle) -> str:
    db = relay.server.db
    assert db is not None
    d = await domains.get(db, DOMAIN)
    assert d is not None
    return d.state


@pytest.mark.parametrize("outage", ["servfail", "down"])
async def test_dns_outage_changes_no_domain_state(
    dns_relay: RelayHandle, dns_server: TestDNSServer, clock: ManualClock, outage: str
) -> None:
    relay = dns_relay
    await relay.add_user(LOGIN)  # a verified domain; nothing of it is published in DNS
    cfg = relay.server.cfg

    def break_dns(on: bool) -> None:
        if outage == "servfail":
            dns_server.servfail(None, on)
        else:
            dns_server.blackhole(on)

    break_dns(True)
    await relay.server.recheck_domains()
    assert await state(relay) == "verified"
    # Definite answers (the records are missing) do change it: the checks really ran.
    break_dns(False)
    await relay.server.recheck_domains()
    assert await state(relay) == "failing"
    # Past the grace period an outage still suspends nothing...
    clock.advance(float(cfg.dns.failure_grace) + 1)
    break_dns(True)
    await relay.server.recheck_domains()
    assert await state(relay) == "failing"
    # ...while a definite failure then does.
    break_dns(False)
    await relay.server.recheck_domains()
    assert await state(relay) == "suspended"


@pytest.mark.parametrize("outage", ["servfail", "down"])
async def test_mx_delivery_is_deferred_while_dns_fails(
    relay_cfg: Config,
    dns_cfg: Config,
    dns_server: TestDNSServer,
    tls_files: tuple[Path, Path, Path],
    clock: ManualClock,
    sink_factory: SinkFactory,
    outage: str,
) -> None:
    sink = await sink_factory("127.0.0.2")
    dns_server.add_mx("dest.test", 10, "mx.dest.test")
    dns_server.add_a("mx.dest.test", "127.0.0.2")
    delivery = dataclasses.replace(
        relay_cfg.delivery,
        paused=False,
        mode="mx",
        port=sink.port,
        tls="none",
        connect_timeout=Duration(1),
        command_timeout=Duration(1),
    )
    cfg = dataclasses.replace(relay_cfg, dns=dns_cfg.dns, delivery=delivery)
    relay = await started(cfg, tls_files, clock)
    try:
        password = await relay.add_user(LOGIN)
        if outage == "servfail":
            dns_server.servfail("dest.test")
        else:
            dns_server.blackhole(True)
        msg_id = await submit(relay, password, "dns")
        await idle(relay)
        st, reply = await state_of(relay, msg_id)
        assert st == "deferred" and reply.startswith("451 4.4.3"), reply
        if outage == "servfail":
            dns_server.servfail("dest.test", False)
        else:
            dns_server.blackhole(False)
        clock.advance(BACKOFF[0])
        await idle(relay)
        await sink.wait_received(1)
        await idle(relay)
        assert copies(sink, "dns") == 1
        assert (await state_of(relay, msg_id))[0] == "delivered"
    finally:
        await stopped(relay)
