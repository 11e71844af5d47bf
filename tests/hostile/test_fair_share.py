"""Fair shares of the DATA memory budget, and the bulk DATA reader (issue 12, item 3).

One user, or one client address, holding DATA sessions open must not lock everyone else out of the
budget: each has a share of it (``limits.data_memory_share_per_user`` / ``_per_ip``, a quarter by
default), and over it only that client gets 451 4.3.1. A DATA reserves by the size the client
declared (``MAIL FROM:<...> SIZE=n``, RFC 1870), or a small first step that grows with the message.

The DATA reader takes the message in bulk; its result must be exactly the old per-line reader's, on
any input cut anywhere: a property test drives both over generated streams, fed to a real
StreamReader piece by piece, and a live test sends tricky messages to the server in tiny writes.

Clients come from several loopback addresses (127.0.0.x: all of 127/8 is loopback on Linux), so
the server sees distinct client IPs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay import config as config_mod
from relay import replies
from relay.clock import ManualClock
from relay.config import Config
from relay.replies import Reply
from relay.smtp.data import DataReader
from relay.smtp.gate import MemoryBudget
from tests.dialogue import Dialogue
from tests.hostile.kit import LOGIN, message, queued, started, stopped, with_limits
from tests.relayserver import RelayHandle

KiB, MiB = 1024, 1024 * 1024
# The reservation rule (relay/smtp/data.py, README "Resources"): a message held in DATA costs 6x
# its size; without SIZE= a DATA starts with a 64 KiB step and grows in 64 KiB steps.
FACTOR, STEP = 6, 64 * KiB
QUEUED = "250 2.0.0 queued as "
START = str(replies.START_DATA)
OTHER = "other@example.com"


async def session_from(relay: RelayHandle, ip: str) -> Dialogue:
    """An implicit-TLS session whose client address is ``ip``."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        relay.tls_port,
        ssl=relay.client_context(),
        server_hostname="relay.test",
        local_addr=(ip, 0),
    )
    d = Dialogue(reader, writer)
    await d.expect("220")
    return d


class Clients:
    """A relay with a small DATA budget, and the sessions a test opened on it (closed after)."""

    def __init__(self, relay: RelayHandle) -> None:
        self.relay = relay
        self.sessions: list[Dialogue] = []

    async def open_data(self, login: str, password: str, ip: str, size: str = "") -> str:
        """Log in from ``ip`` and start DATA; the reply to DATA (the session is kept open)."""
        d = await session_from(self.relay, ip)
        self.sessions.append(d)
        await d.login(login, password)
        await d.expect_after(f"MAIL FROM:<{login}>{size}", "250 2.1.0")
        await d.expect_after("RCPT TO:<r@dest.test>", "250 2.1.5")
        return await d.reply_after("DATA")

    async def fill(self, opener: Callable[[int], Awaitable[str]]) -> int:
        """Open idle DATA sessions with ``opener(i)`` until one is refused; how many got in.
        Bounded: a share that never refuses fails here."""
        for i in range(40):
            reply = await opener(i)
            if reply != START:
                assert reply == str(replies.MEMORY_BUSY), reply
                return i
        raise AssertionError("40 idle DATA sessions and no share was ever full")

    def abort_all(self) -> None:
        for d in self.sessions:
            d.writer.transport.abort()
        self.sessions.clear()

    async def all_given_back(self) -> None:
        """Until the budget holds nothing for anyone (the server counts a close a moment after
        the client's abort), within a few seconds."""
        memory = self.relay.server.gate.memory
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while memory.used or memory.by_user or memory.by_ip:
            assert loop.time() < deadline, (memory.used, memory.by_user, memory.by_ip)
            await asyncio.sleep(0.01)  # sleep-ok: polling the server's accounting, bounded above


@pytest.fixture
async def small(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> AsyncIterator[Clients]:
    """A relay with an 8 MiB DATA budget and the default shares (a quarter each: 2 MiB)."""
    relay = await started(with_limits(relay_cfg, data_memory_budget=8 * MiB), tls_files, clock)
    clients = Clients(relay)
    try:
        yield clients
    finally:
        clients.abort_all()
        await stopped(relay)


async def test_one_users_idle_data_sessions_do_not_starve_another_user(small: Clients) -> None:
    """A's idle DATA sessions, each from an address of its own (so only the user's share can stop
    them), are refused once A holds its share, while the budget still has room; B still gets in
    and its message is queued."""
    relay, memory = small.relay, small.relay.server.gate.memory
    pw_a = await relay.add_user(LOGIN)
    pw_b = await relay.add_user(OTHER)
    got_in = await small.fill(lambda i: small.open_data(LOGIN, pw_a, f"127.0.0.{10 + i}"))
    assert got_in >= 1
    assert await small.open_data(OTHER, pw_b, "127.0.0.99") == START
    held_by_a = memory.by_user[LOGIN]
    assert held_by_a + FACTOR * STEP > memory.total // 4  # A's share: a quarter by default
    assert memory.used + FACTOR * STEP <= memory.total, "refused by the budget, not A's share"
    b = small.sessions[-1]
    b.send_raw(message(sender=OTHER) + b".\r\n")
    await b.writer.drain()
    assert (await b.reply()).startswith(QUEUED)
    assert len(await queued(relay)) == 1
    small.abort_all()
    await small.all_given_back()


async def test_one_addresss_idle_data_sessions_do_not_starve_another_address(
    small: Clients,
) -> None:
    """Different users behind one address: once that address holds its share, its next DATA (a
    user with nothing held yet) is refused; a client from another address still gets in."""
    relay, memory = small.relay, small.relay.server.gate.memory
    logins = [f"app{i}@example.com" for i in range(12)]
    passwords = {login: await relay.add_user(login) for login in logins}
    pw_b = await relay.add_user(OTHER)
    got_in = await small.fill(
        lambda i: small.open_data(logins[i], passwords[logins[i]], "127.0.0.2")
    )
    assert 1 <= got_in < len(logins)
    assert memory.used + FACTOR * STEP <= memory.total, "refused by the budget, not the share"
    assert await small.open_data(OTHER, pw_b, "127.0.0.3") == START
    small.abort_all()  # every share is given back when the sessions go
    await small.all_given_back()


async def test_a_declared_size_is_reserved_up_front(small: Clients) -> None:
    """RFC 1870 SIZE=: DATA reserves 6x the declared size at once (a message that cannot fit in
    the client's share is refused before any of it is sent), and a message of that size needs no
    more; without SIZE= a DATA starts small."""
    relay, memory = small.relay, small.relay.server.gate.memory
    password = await relay.add_user(LOGIN)
    # 1 MiB declared: 6 MiB, over the 2 MiB share of an 8 MiB budget that is otherwise free.
    reply = await small.open_data(LOGIN, password, "127.0.0.2", size=f" SIZE={MiB}")
    assert reply == str(replies.MEMORY_BUSY)
    assert memory.used == 0 and memory.peak == 0
    # Without SIZE=: one first step.
    assert await small.open_data(LOGIN, password, "127.0.0.2") == START
    assert memory.used == FACTOR * STEP
    small.abort_all()
    await small.all_given_back()
    # A declared 300 KiB message reserves exactly 6 x 300 KiB, and holds no more while it arrives.
    data = message(body=(b"s" * 98 + b"\r\n") * 3000)
    size = len(data)
    assert STEP < size < 2 * MiB // FACTOR
    assert await small.open_data(LOGIN, password, "127.0.0.2", size=f" SIZE={size}") == START
    assert memory.used == FACTOR * size
    d = small.sessions[-1]
    d.send_raw(data + b".\r\n")
    await d.writer.drain()
    assert (await d.reply()).startswith(QUEUED)
    assert memory.peak == FACTOR * size
    assert memory.used == 0


async def test_a_message_larger_than_declared_grows_in_steps(small: Clients) -> None:
    relay, memory = small.relay, small.relay.server.gate.memory
    password = await relay.add_user(LOGIN)
    data = message(body=(b"g" * 98 + b"\r\n") * 1500)  # about 150 KiB, declared as 1000
    assert 2 * STEP < len(data) < 3 * STEP
    assert await small.open_data(LOGIN, password, "127.0.0.2", size=" SIZE=1000") == START
    assert memory.used == FACTOR * 1000
    d = small.sessions[-1]
    d.send_raw(data + b".\r\n")
    await d.writer.drain()
    assert (await d.reply()).startswith(QUEUED)
    assert memory.peak == FACTOR * 3 * STEP
    assert memory.used == 0


@pytest.mark.parametrize(
    ("value", "share"), [(0.5, 0.5), ("50%", 0.5), (1, 1.0), ("12.5 %", 0.125)]
)
def test_share_keys_take_a_fraction(value: object, share: float) -> None:
    for key in ("data_memory_share_per_user", "data_memory_share_per_ip"):
        cfg = config_mod.from_dict({"limits": {key: value}})
        assert getattr(cfg.limits, key) == share
    assert config_mod.Config().limits.data_memory_share_per_user == 0.25


@pytest.mark.parametrize("value", [0, 1.5, -0.25, "0%", "150%", "half", True, float("nan"), [1]])
def test_share_keys_refuse_what_is_not_a_share(value: object) -> None:
    for key in ("data_memory_share_per_user", "data_memory_share_per_ip"):
        with pytest.raises(config_mod.ConfigError, match=f"^limits.{key}: .*(share|fraction)"):
            config_mod.from_dict({"limits": {key: value}})


def test_memory_budget_shares() -> None:
    """Each reservation counts against the total, its user's share and its address's share;
    release gives back exactly what was taken and forgets keys that hold nothing."""
    budget = MemoryBudget(100, user_share=0.5, ip_share=0.3)
    assert budget.try_reserve(30, user="a", ip="1")
    assert not budget.try_reserve(1, user="b", ip="1")  # address 1 holds its 30
    assert budget.try_reserve(20, user="a", ip="2")
    assert not budget.try_reserve(1, user="a", ip="3")  # user a holds its 50
    assert budget.try_reserve(30, user="b", ip="2") is False  # 2 would hold 50
    assert budget.try_reserve(10, user="b", ip="2")
    assert (budget.used, budget.by_user["a"], budget.by_ip["2"]) == (60, 50, 30)
    budget.release(30, user="a", ip="1")
    assert "1" not in budget.by_ip and budget.by_user["a"] == 20
    assert budget.try_reserve(30, user="c", ip="1")
    budget.release(20, user="a", ip="2")
    budget.release(10, user="b", ip="2")
    budget.release(30, user="c", ip="1")
    assert budget.used == 0 and not budget.by_user and not budget.by_ip
    assert budget.peak == 60
    # Without keys only the total counts (the budget as it was: the whole of it for anyone).
    assert budget.try_reserve(100) and not budget.try_reserve(1)


# --- the bulk reader against the per-line reader -------------------------------------------------


async def per_line_reader(
    reader: asyncio.StreamReader, limit: int
) -> tuple[Reply | None, bytes | None]:
    """The DATA reader as it was before the bulk reader (relay/smtp/session.py ``_read_data`` at
    b6f0eca), one ``readuntil(CRLF)`` per line, with the memory accounting left out: the
    reference the bulk reader must agree with."""
    buf = bytearray()
    problem: Reply | None = None
    in_long_line = False
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
            problem = problem or replies.LINE_TOO_LONG
            buf.clear()
            in_long_line = True
            continue
        if in_long_line:
            in_long_line = False
            continue
        if line == b".\r\n":
            break
        if problem is not None:
            continue
        body = line[:-2]
        if b"\r" in body or b"\n" in body:
            problem = replies.BARE_LINE_ENDING
        elif b"\0" in body:
            problem = replies.NUL_IN_MESSAGE
        elif len(line) - line.startswith(b".") > 1000:
            problem = replies.LINE_TOO_LONG
        elif len(buf) + len(line) - line.startswith(b".") > limit:
            problem = replies.MESSAGE_TOO_BIG
        if problem is not None:
            buf.clear()
            continue
        if line.startswith(b"."):
            line = line[1:]
        buf += line
    if problem is not None:
        return problem, None
    return None, bytes(buf)


async def settled(task: asyncio.Task[object], reader: asyncio.StreamReader) -> None:
    """Until the reading task is done or waits for more data (it awaits nothing else)."""
    for _ in range(10_000):
        if task.done() or reader._waiter is not None:  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0)  # sleep-ok: yields to the reading task, no time passes
    raise AssertionError("the reader neither finished nor waited")


Outcome = tuple[str, Reply | None, bytes | None, bytes]


async def run_reader(
    read: Callable[[asyncio.StreamReader], object], pieces: list[bytes]
) -> Outcome:
    """Feed ``pieces`` one at a time, each once the reader has settled on the ones before; the
    outcome: done or waiting, the refusal, the content, and what is left unread for the session."""
    reader = asyncio.StreamReader(limit=1001)  # aiosmtpd's SMTP.line_length_limit
    task: asyncio.Task[tuple[Reply | None, bytes | None]] = asyncio.ensure_future(read(reader))  # type: ignore[arg-type]
    for piece in pieces:
        reader.feed_data(piece)
        await settled(task, reader)  # type: ignore[arg-type]
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return "waiting", None, None, b""
    problem, content = task.result()
    return "done", problem, content, bytes(reader._buffer)  # type: ignore[attr-defined]


def bulk(limit: int, normalize: bool = False) -> Callable[[asyncio.StreamReader], object]:
    budget = MemoryBudget(1 << 40)
    hold = budget.hold("u", "ip")
    return lambda reader: DataReader(limit, hold, None, normalize=normalize).read(reader)


TOKENS = [
    b"\r\n", b"\r", b"\n", b".", b"..", b"\0", b"x", b" ", b"\r\n.\r\n", b"\r\n.", b".\r\n",
    b"\r\n..", b"\n.\n", b"\r.\r\n", b"From: a@example.com\r\n", b"\r\n\r\n",
]  # fmt: skip
token = st.one_of(
    st.sampled_from(TOKENS),
    st.binary(max_size=6),
    st.integers(990, 1010).map(lambda n: b"y" * n),  # around the line limit
    st.integers(1, 2500).map(lambda n: b"z" * n),
)
stream = st.lists(token, max_size=40).map(b"".join)
END = b"\r\n.\r\nNOOP\r\n"  # often a real end, and something behind it for the session


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, at, i = [], 0, 0
    while at < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        pieces.append(data[at : at + n])
        at, i = at + n, i + 1
    return pieces


@settings(max_examples=600, deadline=None)
# Cuts that matter, besides the random ones: a long line cut just after a dot, then a read with no
# end in it (the dot must not start a line); an end at once with something behind it; the end cut
# at each of its octets; a CRLF cut between CR and LF right after a long line.
@example(body=b"z" * 3000 + b".\r\n" + b"x" * 1200, end=END, sizes=[3001, 1202, 100], limit=9000)
@example(body=b"", end=b".\r\nNOOP\r\n", sizes=[1], limit=10)
@example(body=b"a", end=END, sizes=[2], limit=10)
@example(body=b"a", end=END, sizes=[3], limit=10)
@example(body=b"a", end=END, sizes=[4], limit=10)
@example(body=b"a", end=END, sizes=[5], limit=10)
@example(body=b"y" * 1005 + b"\r", end=b"\n.\r\nNOOP\r\n", sizes=[1006, 1], limit=9000)
@given(
    body=stream,
    end=st.sampled_from([END, b"", b".\r\n", b"\r\n.\r"]),
    sizes=st.lists(st.integers(1, 3000), max_size=12),
    limit=st.integers(1, 6000),
)
def test_bulk_reader_agrees_with_the_per_line_reader(
    body: bytes, end: bytes, sizes: list[int], limit: int
) -> None:
    data = body + end

    async def both() -> tuple[Outcome, Outcome]:
        ref = await run_reader(lambda r: per_line_reader(r, limit), [data])
        new = await run_reader(bulk(limit), cut(data, sizes))
        return ref, new

    ref, new = asyncio.run(both())
    assert new == ref


@settings(max_examples=400, deadline=None)
@example(body=b"a\n.\r\nMAIL FROM:<x@example.com>", end=END, sizes=[2, 1, 1], limit=9000)
@example(body=b"z" * 3000 + b"\n.\r\n" + b"x" * 10, end=END, sizes=[3001, 3], limit=9000)
@example(body=b"x\n" * 600, end=END, sizes=[7], limit=9000)
@given(
    body=st.lists(st.one_of(token, st.just(b"\n"), st.just(b"\n.")), max_size=40).map(b"".join),
    end=st.sampled_from([END, b"", b".\r\n", b"\r\n.\r"]),
    sizes=st.lists(st.integers(1, 3000), max_size=12),
    limit=st.integers(1, 6000),
)
def test_the_normalizing_reader_ends_where_the_rejecting_one_does(
    body: bytes, end: bytes, sizes: list[int], limit: int
) -> None:
    """``limits.bare_newline = "normalize"``: the message ends where it does in "reject" mode
    (only CRLF . CRLF; no bare LF can start a second transaction), whatever the cuts; what
    "reject" accepts is accepted alike; what is accepted has CRLF line ends only and no NUL."""
    data = body + end

    async def three() -> tuple[Outcome, Outcome, Outcome]:
        ref = await run_reader(bulk(limit), [data])
        whole = await run_reader(bulk(limit, normalize=True), [data])
        new = await run_reader(bulk(limit, normalize=True), cut(data, sizes))
        return ref, whole, new

    ref, whole, new = asyncio.run(three())
    assert new == whole
    assert (new[0], new[3]) == (ref[0], ref[3])
    if ref[0] == "done" and ref[1] is None:
        assert new == ref
    content = new[2]
    if content is not None:
        assert content.count(b"\n") == content.count(b"\r") == content.count(b"\r\n")
        assert b"\0" not in content and len(content) <= limit
        assert ref[1] in (None, replies.BARE_LINE_ENDING, replies.LINE_TOO_LONG)


def test_the_comparison_sees_a_reader_that_takes_a_bare_lf_end() -> None:
    """The property test can fail: a reader that also ends DATA at LF.LF disagrees at once."""

    async def lax(reader: asyncio.StreamReader) -> tuple[Reply | None, bytes | None]:
        data = await reader.readuntil(b"\n.\n")
        return None, data[:-2]

    async def both() -> tuple[Outcome, Outcome]:
        data = b"a\n.\nMAIL FROM:<x@example.com>\r\n.\r\n"
        return (
            await run_reader(lambda r: per_line_reader(r, 100), [data]),
            await run_reader(lax, [data]),
        )

    ref, new = asyncio.run(both())
    assert new != ref


# Messages whose reading depends on where the stream is cut: long lines ending in a dot,
# dot-stuffing, empty lines, a bare LF late, a NUL, a terminator at once.
LIVE = [
    message(body=b"x" * 3000 + b".\r\n" + b"..\r\n" * 50),
    message(body=b"\r\n" * 3000),
    message(body=b"..\r\n.x\r\n" * 300 + b"y" * 998 + b"\r\n"),
    message(body=b"ok\r\n" * 500 + b"late\nLF\r\n" + b"more\r\n" * 10),
    message(body=b"z" * 1001 + b"\r\n"),
    message(body=b"nul\0\r\n"),
    b"",
]


@pytest.mark.parametrize("mode", ["reject", "normalize"])
async def test_the_server_reads_messages_sent_in_tiny_writes(relay: RelayHandle, mode: str) -> None:
    """Each message, written in pieces of 1 to 13 octets (each its own TLS record) with a NOOP
    pipelined behind its end, gets the reply the per-line reader implies (in "normalize" mode:
    the bulk reader reading it whole), the stored body is the content it read, and the NOOP is
    the session's next command: nothing of the message is left over, nothing after its end is
    lost."""
    await relay.server.reload(with_limits(relay.server.cfg, bare_newline=mode), notify=False)
    reference = bulk(25 * MiB, normalize=True) if mode == "normalize" else None
    password = await relay.add_user(LOGIN)
    d = await session_from(relay, "127.0.0.1")
    await d.login(LOGIN, password)
    expected_ids = 0
    for n, data in enumerate(LIVE):
        ref = await run_reader(
            reference or (lambda r: per_line_reader(r, 25 * MiB)), [data + b".\r\n"]
        )
        await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250 2.1.0")
        await d.expect_after("RCPT TO:<r@dest.test>", "250 2.1.5")
        await d.expect_after("DATA", "354")
        for piece in cut(data + b".\r\nNOOP\r\n", [1 + (n + i) % 13 for i in range(97)]):
            d.send_raw(piece)
            await d.writer.drain()
        reply = await d.reply()
        assert await d.reply() == "250 OK"  # the pipelined NOOP
        _, problem, content, _ = ref
        if problem is not None:
            assert reply == str(problem), n
        elif content:
            assert reply.startswith(QUEUED), (n, reply)
            expected_ids += 1
            spool = relay.server.spool
            assert spool is not None
            stored = await spool.load(reply.rsplit(" ", 1)[1])
            assert stored is not None and stored.body is not None
            assert stored.body.endswith(content)
        else:
            assert reply.startswith("5"), reply  # an empty message: refused by the policy
        assert await d.reply_after("NOOP") == "250 OK"
    assert len(await queued(relay)) == expected_ids
    await d.close()


def server_reader(relay: RelayHandle, d: Dialogue) -> asyncio.StreamReader:
    """The server side of this client's connection: its session's stream reader."""
    me = d.writer.get_extra_info("sockname")
    (smtp,) = [
        s
        for s in relay.server.gate.sessions
        if s.transport is not None and s.transport.get_extra_info("peername") == me
    ]
    reader: asyncio.StreamReader = smtp._reader
    return reader


async def test_a_long_smuggled_tail_behind_a_cut_long_line_stays_in_the_message(
    relay: RelayHandle,
) -> None:
    """tests/hostile/test_smuggling.py's cut long line, with a smuggled transaction behind the
    dot that is longer than the reader's lookahead: it arrives in pieces, none up to an end of
    data. Had the dot been taken for a line start, the pieces after it would run as commands."""
    password = await relay.add_user(LOGIN)
    d = await session_from(relay, "127.0.0.1")
    await d.login(LOGIN, password)
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250 2.1.0")
    await d.expect_after("RCPT TO:<r@dest.test>", "250 2.1.5")
    await d.expect_after("DATA", "354")
    d.send_raw(message(body=b"x" * 3000 + b"."))
    await d.writer.drain()
    reader = server_reader(relay, d)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not (reader._waiter is not None and bytes(reader._buffer) == b"."):  # type: ignore[attr-defined]
        assert loop.time() < deadline, "the server never waited holding the dot alone"
        await asyncio.sleep(0.01)  # sleep-ok: polling the server's reader, bounded above
    smuggled = f"MAIL FROM:<{LOGIN}>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n".encode() + message(
        subject="smuggled", body=(b"s" * 70 + b"\r\n") * 40
    )
    assert len(smuggled) > 2000
    d.send_raw(b"\r\n" + smuggled + b".\r\n")
    await d.writer.drain()
    assert await d.reply() == str(replies.LINE_TOO_LONG)
    assert await d.reply_after("NOOP") == "250 OK"
    assert await queued(relay) == []
    await d.close()
