"""The upstream (smarthost) down, hung, or dropping the connection mid-DATA, through the whole
relay: the message is deferred, then delivered exactly once when the upstream is back
(issue 6, item 4). The relay runs with a controllable clock, so "later" is ``clock.advance``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from relay.clock import ManualClock
from relay.config import Config
from relay.delivery.scheduler import BACKOFF
from tests.faults.flow import copies, delivering, idle, state_of, submit
from tests.faults.upstream import ANY, Upstream
from tests.hostile.kit import LOGIN, queued, started, stopped
from tests.relayserver import RelayHandle
from tests.sink import Sink, SinkFactory

Starter = Callable[[int], Awaitable[RelayHandle]]


@pytest.fixture
async def relay_to(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> AsyncIterator[Starter]:
    handles: list[RelayHandle] = []

    async def start(port: int) -> RelayHandle:
        handle = await started(delivering(relay_cfg, port), tls_files, clock)
        handles.append(handle)
        return handle

    yield start
    for h in handles:
        await stopped(h)


async def comes_back(
    relay: RelayHandle, clock: ManualClock, sink: Sink, msg_id: str, tag: str
) -> None:
    """After the first back-off the message goes through, once, and stays delivered."""
    clock.advance(BACKOFF[0])
    await idle(relay)
    await sink.wait_received(1)
    await idle(relay)
    assert copies(sink, tag) == 1
    assert (await state_of(relay, msg_id))[0] == "delivered"
    assert [m.count("delivered") for m in await queued(relay)] == [1]


async def test_upstream_down_then_back(
    relay_to: Starter, sink_factory: SinkFactory, clock: ManualClock
) -> None:
    sink = await sink_factory()
    port = sink.port
    await sink.stop()
    relay = await relay_to(port)
    password = await relay.add_user(LOGIN)
    msg_id = await submit(relay, password, "down")
    await idle(relay)
    state, reply = await state_of(relay, msg_id)
    assert state == "deferred" and reply.startswith("451 4.4.1"), reply
    await sink.start()
    await comes_back(relay, clock, sink, msg_id, "down")


def tarpit() -> Upstream:
    """Accepts the connection and never says anything (a hung or overloaded host)."""
    return Upstream(greet=False)


def drops_in_data() -> Upstream:
    """Greets, accepts EHLO, MAIL and RCPT, answers DATA with 354, reads the first line of the
    message and drops the connection (a crash or a network cut mid-transfer), every time."""
    up = Upstream(extensions=())
    up.drop_at.add((ANY, "content", 1))
    return up


@pytest.mark.parametrize(
    ("make", "tag", "deferred_with", "what_it_saw"),
    [
        (tarpit, "hung", "451 4.", lambda up: up.connections >= 1),
        # The transfer was started once and cut after its first line.
        (drops_in_data, "dropped", "451 4.4.2", lambda up: [n for n, _ in up.partial] == [1]),
    ],
    ids=["hung", "drops-mid-data"],
)
async def test_upstream_misbehaving_then_back(
    relay_to: Starter,
    sink_factory: SinkFactory,
    clock: ManualClock,
    make: Callable[[], Upstream],
    tag: str,
    deferred_with: str,
    what_it_saw: Callable[[Upstream], bool],
) -> None:
    bad = make()
    await bad.start()
    relay = await relay_to(bad.port)
    password = await relay.add_user(LOGIN)
    msg_id = await submit(relay, password, tag)
    await idle(relay)
    state, reply = await state_of(relay, msg_id)
    assert state == "deferred" and reply.startswith(deferred_with), reply
    assert what_it_saw(bad)
    await bad.stop()
    sink = await sink_factory(port=bad.port)
    await comes_back(relay, clock, sink, msg_id, tag)


async def test_upstream_temporary_refusal_then_accepts(
    relay_to: Starter, sink: Sink, clock: ManualClock
) -> None:
    """A 4xx at the end of DATA: the upstream did not take it, so it is sent again, once."""
    sink.script_data("451 4.3.0 try later")
    relay = await relay_to(sink.port)
    password = await relay.add_user(LOGIN)
    msg_id = await submit(relay, password, "refused")
    await idle(relay)
    assert await state_of(relay, msg_id) == ("deferred", "451 4.3.0 try later")
    assert copies(sink, "refused") == 0
    await comes_back(relay, clock, sink, msg_id, "refused")
