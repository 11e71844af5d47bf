"""Large messages streamed to disk while DATA reads them, and signed from there (issue 17).

Past SPILL_AT octets a message's body goes to an unnamed file in the state directory as it
arrives, hashed for DKIM on the way; the spool copies it into the message's row in the
transaction that queues it. Shown against the real server, a real client and a real sink:
- a message six times the DATA memory budget's room for it is accepted, delivered byte for byte
  and its DKIM signature verifies against the key in the loopback DNS; the budget held a small
  fraction of its size;
- eight such messages in parallel from one user are all accepted, each stored whole;
- a streamed message refused (too big) or cut off (the client goes away) queues nothing, and its
  file is closed: no descriptor of the process points at an unnamed file in the state directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import dkim
import pytest

from relay.clock import ManualClock
from relay.config import Config
from relay.smtp.data import MEMORY_FACTOR
from relay.smtp.spill import CHUNK, SPILL_AT, Spill
from relay.store.spool import Spool
from relay.units import Duration, Size
from tests.dialogue import Dialogue
from tests.dnsserver import TestDNSServer
from tests.hostile.kit import LOGIN, authed, eventually, queued, started, stopped, with_limits
from tests.relayserver import RelayHandle
from tests.sink import Sink
from tests.test_delivery import smarthost_cfg
from tests.test_e2e import dnsfunc_for, verified_relay

MIB = 1024 * 1024
# Lines a receiver canonicalises: runs of white space, white space at line ends, a stuffed dot,
# and empty lines at the very end (not part of the body's hash).
LINES = (b"plain text line\r\n", b"runs  of \t spaces \t\r\n", b".dot first\r\n", b"\r\n")


def big_message(to: str, size: int, tag: str = "") -> bytes:
    head = f"From: App <{LOGIN}>\r\nTo: <{to}>\r\nSubject: big {tag}\r\n\r\n".encode()
    pattern = b"".join(LINES)
    body = pattern * (size // len(pattern)) + b"the end\r\n\r\n\r\n"
    return head + body


def stuffed(message: bytes) -> bytes:
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def open_data_files(state_dir: Path) -> list[str]:
    """The spill files this process still has open: unnamed files in the state directory
    (O_TMPFILE, or a name removed at once; /proc shows either as '... (deleted)')."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{state_dir}/") and target.endswith(" (deleted)"):
            found.append(target)
    return found


async def start_data(d: Dialogue, to: str) -> None:
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
    await d.expect_after(f"RCPT TO:<{to}>", "250")
    await d.expect_after("DATA", "354")


async def send_big(relay: RelayHandle, password: str, message: bytes, to: str) -> str:
    d = await authed(relay, password)
    await start_data(d, to)
    reply = await d.expect_after(stuffed(message), "250 2.0.0 queued as ", within=60)
    await d.close()
    return reply.split()[-1]


async def test_a_message_larger_than_its_memory_room_is_delivered_signed(
    dns_cfg: Config,
    relay_cfg: Config,
    tls_files: tuple[Path, Path, Path],
    clock: ManualClock,
    dns_server: TestDNSServer,
    sink: Sink,
) -> None:
    size = 4 * MIB
    budget = 16 * MIB  # held in memory, this message would need MEMORY_FACTOR x 4 MiB
    assert MEMORY_FACTOR * size > budget
    cfg = with_limits(
        smarthost_cfg(
            dataclasses.replace(relay_cfg, dns=dns_cfg.dns),
            sink,
            paused=False,
            command_timeout=Duration(60),  # the sink's reply to 4 MiB, beside dkim.verify
        ),
        data_memory_budget=Size(budget),
        data_memory_share_per_user=1.0,
        data_memory_share_per_ip=1.0,
    )
    relay = await verified_relay(cfg, tls_files[2], clock, dns_server)
    try:
        password = await relay.add_user(LOGIN)
        message = big_message("x@dest.test", size)
        queue_id = await send_big(relay, password, message, "x@dest.test")
        memory = relay.server.gate.memory
        # What is held: the part kept before the body went to disk, a CHUNK, what a read took
        # (MEMORY_FACTOR x 512 KiB reserved at least; under load a read may take more).
        assert MEMORY_FACTOR * (SPILL_AT + CHUNK) <= memory.peak < MEMORY_FACTOR * size / 4
        await eventually(lambda: open_data_files(cfg.state_dir) == [], what="files closed")

        (got,) = await sink.wait_received(1, within=60)
        assert got.data.startswith(b"DKIM-Signature:")
        assert got.data.endswith(message.split(b"\r\n\r\n", 1)[1])  # the body, exactly
        verify = dnsfunc_for(dns_server.port)
        assert await asyncio.to_thread(dkim.verify, got.data, dnsfunc=verify)
        changed = got.data[:-40] + b"X" + got.data[-39:]
        assert not await asyncio.to_thread(dkim.verify, changed, dnsfunc=verify)
        await relay.server.deliverer.wait_idle()
        assert relay.server.spool is not None
        shown = await relay.server.spool.show(queue_id)
        assert shown is not None and {r.state for r in shown.recipients} == {"delivered"}
    finally:
        await relay.server.shutdown()
        relay.close()


async def test_parallel_large_messages_of_one_user_are_all_accepted_whole(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> None:
    count, size = 8, 3 * MIB
    budget = 48 * MIB  # held in memory, each would need 18 MiB: two at a time at most
    cfg = with_limits(
        relay_cfg,
        data_memory_budget=Size(budget),
        data_memory_share_per_user=1.0,
        data_memory_share_per_ip=1.0,
    )
    relay = await started(cfg, tls_files, clock)
    try:
        password = await relay.add_user(LOGIN)
        messages = [big_message(f"r{i}@dest.test", size, str(i)) for i in range(count)]
        ids = await asyncio.gather(
            *(send_big(relay, password, m, f"r{i}@dest.test") for i, m in enumerate(messages))
        )
        assert len(set(ids)) == count
        spool = relay.server.spool
        assert spool is not None
        for queue_id, m in zip(ids, messages, strict=True):
            stored = await spool.load(queue_id)
            assert stored is not None and stored.body is not None
            assert stored.body.endswith(m) and stored.size == len(stored.body)
        assert relay.server.gate.memory.peak <= budget
        assert relay.server.gate.memory.used == 0
        await eventually(lambda: open_data_files(cfg.state_dir) == [], what="files closed")
    finally:
        await stopped(relay)


async def test_a_streamed_message_refused_or_cut_off_leaves_nothing(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> None:
    cfg = with_limits(relay_cfg, max_message_size=Size(2 * MIB))
    relay = await started(cfg, tls_files, clock)
    try:
        password = await relay.add_user(LOGIN)
        d = await authed(relay, password)
        await start_data(d, "a@dest.test")
        await d.expect_after(stuffed(big_message("a@dest.test", 3 * MIB)), "552 5.3.4", within=60)
        await eventually(lambda: open_data_files(cfg.state_dir) == [], what="files closed")

        await start_data(d, "b@dest.test")
        d.send_raw(big_message("b@dest.test", MIB))  # well past SPILL_AT, and no end
        await d.writer.drain()
        await eventually(lambda: open_data_files(cfg.state_dir) != [], what="the body on disk")
        d.writer.close()  # the client goes away mid-DATA
        await eventually(lambda: open_data_files(cfg.state_dir) == [], what="the spill file closed")
        await eventually(lambda: relay.server.gate.memory.used == 0, what="its room given back")
        assert await queued(relay) == []
    finally:
        await stopped(relay)


async def test_the_spools_handle_outlives_a_session_cut_off_before_the_copy(
    cfg: Config, clock: ManualClock
) -> None:
    """The client goes away while its message waits for the spool's writer: the session closes
    its spill (end of DATA) before the copy runs. The spool reads through a handle of its own, so
    the message is stored whole (nobody got a 250 for it, but nothing of it is lost or mixed up),
    and the handle is closed once copied. Other messages in the same batch are not failed."""
    spool = await Spool.open(cfg, clock=clock)
    try:
        body = big_message("a@dest.test", MIB)
        head, rest = body[: body.index(b"\r\n\r\n") + 4], body[body.index(b"\r\n\r\n") + 4 :]
        spill = Spill(cfg.state_dir)
        for i in range(0, len(rest), CHUNK):
            await spill.write(rest[i : i + CHUNK])
        handle = spill.handoff()
        queued_big = asyncio.ensure_future(
            spool.enqueue(
                sender=LOGIN, recipients=["a@dest.test"], body=head, user=LOGIN, tail=handle
            )
        )
        small = asyncio.ensure_future(
            spool.enqueue(sender=LOGIN, recipients=["b@dest.test"], body=b"x\r\n", user=LOGIN)
        )
        await spill.close()  # before the writer ran: the loop has not turned since
        big_id, small_id = await asyncio.gather(queued_big, small)
        stored = await spool.load(big_id)
        assert stored is not None and stored.body == body and stored.size == len(body)
        assert (await spool.load(small_id)) is not None
        assert open_data_files(cfg.state_dir) == []
        with pytest.raises(RuntimeError):
            spill.handoff()
    finally:
        await spool.close()


async def test_bodies_on_disk_are_held_to_the_disk_budget_and_its_shares(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> None:
    """limits.data_disk_budget bounds what DATA in progress may put on disk (with the same
    per-user and per-address shares as memory): a user past its share gets 452 4.3.1 and
    nothing is queued; a message within it passes, and the budget is empty afterwards."""
    cfg = with_limits(relay_cfg, data_disk_budget=Size(8 * MIB))  # a quarter each: 2 MiB
    relay = await started(cfg, tls_files, clock)
    disk = relay.server.gate.disk
    try:
        password = await relay.add_user(LOGIN)
        d = await authed(relay, password)
        await start_data(d, "a@dest.test")
        refused = await d.expect_after(stuffed(big_message("a@dest.test", 3 * MIB)), "452 4.3.1")
        assert "storage" in refused.lower()
        assert await queued(relay) == []
        assert 0 < disk.peak <= 2 * MIB and disk.used == 0
        await d.close()
        queue_id = await send_big(relay, password, big_message("b@dest.test", MIB), "b@dest.test")
        assert [m.id for m in await queued(relay)] == [queue_id]
        assert disk.used == 0
    finally:
        await stopped(relay)
