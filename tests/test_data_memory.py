"""A DATA refused for memory gives its room back at once, not when its end is read (issue 17).

Two sessions of one user fill the whole DATA memory budget between them, half each. The first
then grows past it and is refused (451 4.3.1, given once its end is read); while its DATA is
still open, the second grows into the room the first gave back and is accepted. With the room
held until the first's end, the second would be refused too: the shape of 32 parallel 10 MiB
messages that all ran out together and none was accepted.
"""

from __future__ import annotations

from pathlib import Path

from relay.clock import ManualClock
from relay.config import Config
from relay.smtp.data import MEMORY_FACTOR, STEP
from relay.smtp.spill import SPILL_AT
from tests.hostile.kit import LOGIN, authed, eventually, queued, started, stopped, with_limits

LINE = b"x" * 78 + b"\r\n"  # 80 octets
# Held in memory below SPILL_AT (beyond it the body goes to disk and the room stops growing).
HALF = 3 * STEP - 2 * len(LINE)  # rounds up to 3 STEPs of room
BUDGET = MEMORY_FACTOR * 6 * STEP  # room for both halves, exactly
assert 4 * STEP <= SPILL_AT  # the first is refused before its body could go to disk


def lines(n_octets: int) -> bytes:
    return LINE * (n_octets // len(LINE))


async def test_a_refused_data_gives_its_room_back_before_its_end(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> None:
    cfg = with_limits(
        relay_cfg,
        data_memory_budget=BUDGET,
        data_memory_share_per_user=1.0,
        data_memory_share_per_ip=1.0,
    )
    relay = await started(cfg, tls_files, clock)
    memory = relay.server.gate.memory
    try:
        password = await relay.add_user(LOGIN)
        first, second = await authed(relay, password), await authed(relay, password)
        for i, d in enumerate((first, second)):
            await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
            await d.expect_after(f"RCPT TO:<rcpt{i}@dest.test>", "250")
            await d.expect_after("DATA", "354")
            head = f"From: {LOGIN}\r\nTo: rcpt{i}@dest.test\r\nSubject: half\r\n\r\n".encode()
            d.send_raw(head + lines(HALF - len(head)))
            await d.writer.drain()
        await eventually(lambda: memory.used == BUDGET, what="both halves held: budget full")

        first.send_raw(lines(STEP))  # no room to grow: refused, its room given back
        await first.writer.drain()
        half_room = MEMORY_FACTOR * 3 * STEP
        await eventually(lambda: memory.used == half_room, what="the refused one's room released")

        second.send_raw(lines(2 * STEP) + b".\r\n")  # grows into it, to 5 of the 6 STEPs
        reply = await second.expect("250 2.0.0 queued as ")
        first.send_raw(b".\r\n")
        await first.expect("451 4.3.1")
        assert [m.id for m in await queued(relay)] == [reply.split()[-1]]
        assert memory.used == 0
        assert memory.peak <= BUDGET
        for d in (first, second):
            await d.expect_after("QUIT", "221")
    finally:
        await stopped(relay)
