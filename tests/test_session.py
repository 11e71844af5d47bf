"""The SMTP session (relay/session.py) against the real server: the DATA reader's line and size
limits, the memory budget it reserves from, AUTH response lines, the idle timer after DATA and a
command in progress during a drain. Exact replies; everything on loopback, ephemeral ports.

Fast on purpose: it runs first for every mutant of relay/session.py (tests/mutation/modules.toml).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import tracemalloc

import pytest

from relay import replies
from relay.smtp.gate import MemoryBudget
from relay.smtp.session import RelaySMTP
from tests.dialogue import Dialogue, b64, plain
from tests.hostile.kit import LOGIN, authed, eventually, message, queued, with_limits
from tests.relayserver import RelayHandle

MiB = 1024 * 1024
QUEUED = "250 2.0.0 queued as "


@pytest.fixture
async def relay(relay: RelayHandle) -> RelayHandle:
    """The shared ``relay``, with a short drain: a test that fails in the middle of a transaction
    leaves its session open, and the shutdown at teardown would wait the whole drain_timeout
    (30 s) for it, more than the mutation run gives a mutant."""
    await relay.server.reload(with_limits(relay.server.cfg, drain_timeout=0.1), notify=False)
    return relay


async def start_data(d: Dialogue) -> None:
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250 2.1.0")
    await d.expect_after("RCPT TO:<r@dest.test>", "250 2.1.5")
    await d.expect_after("DATA", "354")


async def send_message(d: Dialogue, data: bytes) -> str:
    """One whole transaction; ``data`` is sent as is, then the terminator. Returns the reply."""
    await start_data(d)
    d.send_raw(data + b".\r\n")
    await d.writer.drain()
    return await d.reply()


def filler(n: int) -> bytes:
    """``n`` octets (n >= 2) of short CRLF-ended lines."""
    out = b""
    while n > 100:
        out += b"w" * 98 + b"\r\n"
        n -= 100
    return out + b"w" * (n - 2) + b"\r\n"


def server_session(relay: RelayHandle, d: Dialogue) -> RelaySMTP:
    """The server side of this client's connection (the relay runs in this process)."""
    me = d.writer.get_extra_info("sockname")
    (smtp,) = [
        s
        for s in relay.server.gate.sessions
        if s.transport is not None and s.transport.get_extra_info("peername") == me
    ]
    return smtp


# --- DATA: line length and message size ---------------------------------------------------------


LINES = [  # (a line of a message, accepted?)
    (b"y" * 998 + b"\r\n", True),  # RFC 5321 4.5.3.1.6: 998 octets + CRLF, the longest
    (b"y" * 999 + b"\r\n", False),
    (b"y" * 1000 + b"\r\n", False),
    (b"y" * 1001 + b"\r\n", False),  # the longest the stream reader hands over whole
    (b".." + b"y" * 997 + b"\r\n", True),  # 1001 on the wire: the stuffed dot is not counted
    (b".." + b"y" * 998 + b"\r\n", False),
]


async def test_data_line_length_limit(relay: RelayHandle) -> None:
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    for line, accepted in LINES:
        reply = await send_message(d, message(body=b"first\r\n" + line + b"last\r\n"))
        if accepted:
            assert reply.startswith(QUEUED), (line[:3], len(line), reply)
        else:
            assert reply == str(replies.LINE_TOO_LONG), (line[:3], len(line))
        assert await d.reply_after("NOOP") == "250 OK"
    assert len(await queued(relay)) == 2
    # An overlong line is refused as such, whatever else is wrong in it.
    reply = await send_message(d, message(body=b"a NUL \0 in" + b"y" * 1500 + b"\r\n"))
    assert reply == str(replies.LINE_TOO_LONG)
    await d.close()


async def test_message_of_exactly_the_size_limit_is_accepted(relay: RelayHandle) -> None:
    """max_message_size counts the message as received, without the terminator and with the
    dot-stuffing of earlier lines undone: exactly the limit is accepted, one octet more is not."""
    limit = 4096
    await relay.server.reload(with_limits(relay.server.cfg, max_message_size=limit), notify=False)
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    head = message(body=b"..stuffed\r\n")  # holds ".stuffed": one octet on the wire more
    exact = head + filler(limit + 1 - len(head))
    assert len(exact) - 1 == limit
    assert (await send_message(d, exact)).startswith(QUEUED)
    over = head + filler(limit + 2 - len(head))
    assert await send_message(d, over) == str(replies.MESSAGE_TOO_BIG)
    assert await d.reply_after("NOOP") == "250 OK"
    # The stuffing dot of the line being read does not count either (RFC 1870: the message as
    # it will be stored): exactly the limit, ending in a dot-stuffed line.
    tail = b"..last\r\n"
    exact_stuffed = head + filler(limit + 2 - len(head) - len(tail)) + tail
    assert len(exact_stuffed) - 2 == limit
    assert (await send_message(d, exact_stuffed)).startswith(QUEUED)
    assert len(await queued(relay)) == 2
    await d.close()


# --- DATA: the memory budget ----------------------------------------------------------------


def test_memory_budget_bounds_and_release() -> None:
    budget = MemoryBudget(10)
    assert not budget.try_reserve(11)
    assert budget.try_reserve(10)  # an exact fit
    assert not budget.try_reserve(1)
    assert budget.used == 10 and budget.peak == 10
    budget.release(4)
    assert budget.try_reserve(4)
    budget.release(20)  # more than is held: nothing is owed afterwards, nothing is credited
    assert budget.used == 0
    assert not budget.try_reserve(11)
    assert budget.peak == 10


# A message held in DATA costs 6x its size; without SIZE= a first 64 KiB step is reserved at
# DATA, and the reservation grows in 64 KiB steps as the message does (relay/smtp/data.py).
FACTOR, STEP = 6, 64 * 1024


async def with_budget(relay: RelayHandle, total: int) -> None:
    """The budget alone: the per-user and per-address shares (tests/hostile/test_fair_share.py)
    are the whole of it here."""
    limits = {"data_memory_share_per_user": 1.0, "data_memory_share_per_ip": 1.0}
    cfg = with_limits(relay.server.cfg, data_memory_budget=total, **limits)
    await relay.server.reload(cfg, notify=False)
    assert relay.server.gate.memory.total == total


async def test_data_needs_room_for_a_first_chunk(relay: RelayHandle) -> None:
    password = await relay.add_user(LOGIN)
    await with_budget(relay, FACTOR * STEP - 1)
    d = await authed(relay, password)
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250 2.1.0")
    await d.expect_after("RCPT TO:<r@dest.test>", "250 2.1.5")
    assert await d.reply_after("DATA") == str(replies.MEMORY_BUSY)
    assert relay.server.gate.memory.peak == 0
    await d.close()


async def test_memory_reserved_grows_with_the_message(relay: RelayHandle) -> None:
    """A message of n octets needs 6 x n rounded up to the next 64 KiB step of the budget by its
    end: it is accepted when exactly that is free, refused with 451 4.3.1 one octet short;
    either way all of it is given back, and the session goes on."""
    password = await relay.add_user(LOGIN)
    data = message(body=b"line\r\n" * 20_000)  # about 117 KiB: two steps
    assert STEP < len(data) <= 2 * STEP
    need = FACTOR * 2 * STEP
    await with_budget(relay, need - 1)
    d = await authed(relay, password)
    assert await send_message(d, data) == str(replies.MEMORY_BUSY)
    assert relay.server.gate.memory.used == 0
    assert await queued(relay) == []
    assert await d.reply_after("NOOP") == "250 OK"
    await d.close()
    await with_budget(relay, need)
    d = await authed(relay, password)
    assert (await send_message(d, data)).startswith(QUEUED)
    assert relay.server.gate.memory.peak == need
    assert relay.server.gate.memory.used == 0
    assert len(await queued(relay)) == 1
    await d.close()


FAULTS = [b"a bare\nLF\r\n", b"a bare CR\r\r\n", b"a NUL\0\r\n", b"a bare CR\rinside\r\n"]


async def test_a_refused_message_is_not_held_while_it_is_read(relay: RelayHandle) -> None:
    """Once a line is refused, the rest of the message is read to its end but not kept: with room
    for the first step only, a message of several steps with a bad line early still gets its
    permanent 554 5.6.0, not the temporary 451 of a full budget (a client would retry that for
    ever). In "reject" mode, where a bare LF is a fault too."""
    password = await relay.add_user(LOGIN)
    await relay.server.reload(with_limits(relay.server.cfg, bare_newline="reject"), notify=False)
    await with_budget(relay, FACTOR * STEP)
    d = await authed(relay, password)
    head = message(body=b"-").removesuffix(b"-")
    for fault in FAULTS:
        reply = await send_message(d, head + fault + (b"z" * 998 + b"\r\n") * 200)
        expected = replies.NUL_IN_MESSAGE if b"\0" in fault else replies.BARE_LINE_ENDING
        assert reply == str(expected), fault
        assert relay.server.gate.memory.peak == FACTOR * STEP  # the first step, never more
        assert relay.server.gate.memory.used == 0
    assert await queued(relay) == []
    await d.close()


# --- AUTH responses -----------------------------------------------------------------------------


async def test_auth_response_lines(relay: RelayHandle) -> None:
    """RFC 4954 4: "*" cancels; junk is undecodable; "=" is an empty response; a second AUTH
    after a successful one is 503 5.5.1."""
    password = await relay.add_user(LOGIN)
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.expect_after("EHLO c", "250")
    await d.expect_after("AUTH LOGIN", "334 " + b64("Username:"))
    assert await d.reply_after("*") == str(replies.AUTH_CANCELLED)
    await d.expect_after("AUTH LOGIN", "334 ")
    assert await d.reply_after("%%%") == str(replies.AUTH_MALFORMED)  # "%" sorts before "*"
    await d.expect_after("AUTH LOGIN", "334 ")
    assert await d.reply_after("=") == "334 " + b64("Password:")  # an empty login
    assert await d.reply_after("*") == str(replies.AUTH_CANCELLED)
    await d.expect_after("AUTH LOGIN", "334 ")
    assert await d.reply_after(b64(LOGIN)) == "334 " + b64("Password:")
    assert await d.reply_after(b64(password)) == str(replies.AUTH_OK)
    assert await d.reply_after(f"AUTH PLAIN {plain(LOGIN, password)}") == str(replies.AUTH_ALREADY)
    await d.close()


async def send_line_apart(relay: RelayHandle, d: Dialogue, line: bytes, end: bytes) -> str:
    """Send a long response line in two parts: ``line``, which the server's reader is seen to
    take in whole (first a short piece, seen held; then the rest, seen taken; each one TLS
    record), then ``end``; read the reply. Looks at the stdlib StreamReader's buffer and waiter,
    as tests/hostile/test_smuggling.py does."""
    reader = server_session(relay, d)._reader

    def holds(data: bytes) -> bool:
        waiting = reader._waiter is not None  # type: ignore[attr-defined]
        return waiting and bytes(reader._buffer) == data  # type: ignore[attr-defined]

    for piece, held in ((line[:100], line[:100]), (line[100:], b"")):
        d.send_raw(piece)
        await d.writer.drain()
        await eventually(functools.partial(holds, held), what=f"the server holds {len(held)}")
    d.send_raw(end)
    await d.writer.drain()
    return await d.reply()


async def test_auth_response_lines_up_to_12288_octets(relay: RelayHandle) -> None:
    """RFC 4954 4: a response line of up to 12288 octets (CRLF not counted) is read whole, even
    over the 1000-octet SMTP line; a longer one is refused as undecodable and read to its end,
    so nothing of it is taken for a command."""
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.expect_after("EHLO c", "250")
    await d.expect_after("AUTH LOGIN", "334 ")
    login = "a" * 5000 + "@example.com"
    assert await d.reply_after(b64(login)) == "334 " + b64("Password:")
    assert await d.reply_after(b64("x-password-1")) == str(replies.AUTH_FAILED)
    # 12288 octets of base64: 9216 octets of PLAIN response (an overlong password).
    raw = b"\0" + LOGIN.encode() + b"\0"
    blob = base64.b64encode(raw + b"p" * (9216 - len(raw)))
    assert len(blob) == 12288
    await d.expect_after("AUTH PLAIN", "334 ")
    assert await send_line_apart(relay, d, blob, b"\r\n") == str(replies.AUTH_FAILED)
    # One octet more (a space, which would be stripped if the line were read): refused unread,
    # whether it comes with the CRLF or before it.
    for line, end in ((blob, b" \r\n"), (blob + b" ", b"\r\n")):
        await d.expect_after("AUTH PLAIN", "334 ")
        assert await send_line_apart(relay, d, line, end) == str(replies.AUTH_MALFORMED)
        assert await d.reply_after("NOOP") == "250 OK"
    # Its rest is read to the CRLF however long, in one piece or coming later in more.
    await d.expect_after("AUTH PLAIN", "334 ")
    assert await d.reply_after(blob * 3) == str(replies.AUTH_MALFORMED)
    assert await d.reply_after("NOOP") == "250 OK"
    await d.expect_after("AUTH PLAIN", "334 ")
    more = b"x" * 5000 + b"\r\n"
    assert await send_line_apart(relay, d, blob + b" ", more) == str(replies.AUTH_MALFORMED)
    assert await d.reply_after("NOOP") == "250 OK"
    await d.close()
    # The 12288 octets with their CRLF in the same packet: the limit does not depend on where
    # TCP happens to cut the stream (a new session: the first one has used its failures).
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.expect_after("EHLO c", "250")
    await d.expect_after("AUTH PLAIN", "334 ")
    assert await d.reply_after(blob) == str(replies.AUTH_FAILED)
    await d.close()


async def test_an_overlong_auth_line_is_not_held_in_memory(relay: RelayHandle) -> None:
    """An AUTH response line far over 12288 octets is dropped as it comes, not gathered up to its
    CRLF: 8 MiB of it costs the server (this process: the relay runs in it) far less than 8 MiB.
    """
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.expect_after("EHLO c", "250")
    await d.expect_after("AUTH PLAIN", "334 ")
    piece = b"A" * 65536
    tracemalloc.start()
    try:
        for _ in range(128):
            d.send_raw(piece)
            await d.writer.drain()
        reply = await d.reply_after(b"")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply == str(replies.AUTH_MALFORMED)
    assert peak < 4 * MiB, peak  # about 1 MiB: TLS and stream buffers, both sides
    assert await d.reply_after("NOOP") == "250 OK"
    await d.close()


# --- timers and draining ------------------------------------------------------------------------


async def test_idle_timeout_is_421_then_close(relay: RelayHandle) -> None:
    """RFC 5321 3.8: an idle session is told why before it is closed."""
    await relay.server.reload(with_limits(relay.server.cfg, idle_timeout=0.05), notify=False)
    d = await Dialogue.open(relay.starttls_port)  # the greeting comes first, however late read
    assert await d.closed()
    assert d.tail.decode() == str(replies.IDLE_TIMEOUT) + "\r\n"
    await d.close()


async def test_idle_timer_is_back_after_data(relay: RelayHandle) -> None:
    """DATA runs under limits.data_timeout; once it ends the session is on limits.idle_timeout
    again, counted from then. Looks at the timer aiosmtpd armed (no waiting for it to fire)."""
    limits = relay.server.cfg.limits
    assert limits.data_timeout > limits.idle_timeout  # else this proves nothing
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    assert (await send_message(d, message())).startswith(QUEUED)
    smtp = server_session(relay, d)
    state = smtp.state
    assert state is not None
    await eventually(lambda: not state.in_data, what="DATA finished on the server")
    timer = smtp._timeout_handle
    assert timer is not None and not timer.cancelled()
    left = timer.when() - asyncio.get_running_loop().time()
    assert 0 < left <= limits.idle_timeout
    await d.close()


async def test_drain_lets_a_command_in_progress_finish(relay: RelayHandle) -> None:
    """A session in the middle of a command (here AUTH, waiting for the client's response) is
    not idle: the drain lets it finish, and only its next command gets 421 4.3.2."""
    await relay.server.reload(with_limits(relay.server.cfg, drain_timeout=30), notify=False)
    password = await relay.add_user(LOGIN)
    ctx = relay.client_context()
    busy = await Dialogue.open(relay.tls_port, tls=ctx)
    await busy.expect_after("EHLO busy", "250")
    await busy.expect_after("AUTH LOGIN", "334 ")
    idle = await Dialogue.open(relay.tls_port, tls=ctx)
    await idle.expect_after("EHLO idle", "250")
    stopping = asyncio.create_task(relay.server.shutdown())
    try:
        await idle.expect("421 4.3.2")  # the idle pass went over every session
        assert await idle.closed()
        assert await busy.reply_after(b64(LOGIN)) == "334 " + b64("Password:")
        assert await busy.reply_after(b64(password)) == str(replies.AUTH_OK)
        assert await busy.reply_after("NOOP") == str(replies.SHUTTING_DOWN)
        assert await busy.closed()
    finally:
        await busy.close()
        await idle.close()
        await asyncio.wait_for(stopping, 40)  # the fixture's shutdown would not wait for it


# --- aiosmtpd's hook tables, built from the short listing -----------------------------------------


async def test_session_hook_tables_match_the_full_listing(relay: RelayHandle) -> None:
    """RelaySMTP and Handler list only the names aiosmtpd's constructor looks for (``__dir__``,
    relay/smtp/session.py). The tables of a live session must be exactly those aiosmtpd builds
    from every attribute: the handler's AUTH mechanisms (never aiosmtpd's built-in ones, which
    fail every login here), its hooks, and every command of the session class."""
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    try:
        await d.expect_after("EHLO hooks", "250")
        smtp = server_session(relay, d)
        handler = smtp.event_handler
        full_self, full_handler = object.__dir__(smtp), object.__dir__(handler)
        smtp_names = {n.removeprefix("smtp_") for n in full_self if n.startswith("smtp_")}
        hook_names = {n.removeprefix("handle_") for n in full_handler if n.startswith("handle_")}
        assert set(smtp._smtp_methods) == smtp_names
        assert set(smtp._handle_hooks) == hook_names
        assert {"MAIL", "RCPT", "DATA", "exception"} <= hook_names
        auth = smtp._auth_methods
        assert set(auth) == {"PLAIN", "LOGIN"}  # CRAM-MD5 excluded
        for name, impl in auth.items():
            assert not impl.is_builtin
            assert impl.method == getattr(handler, f"auth_{name}")
        assert set(dir(smtp)) <= set(full_self) and set(dir(handler)) <= set(full_handler)
    finally:
        await d.close()


async def test_a_multi_line_reply_is_one_write(relay: RelayHandle) -> None:
    """aiosmtpd pushes an EHLO reply a line at a time; the session holds the continuation lines
    and writes the whole reply at once (one TLS record, one send), lines and order unchanged."""
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    try:
        smtp = server_session(relay, d)
        transport = smtp._writer.transport
        writes: list[bytes] = []
        real_write = transport.write

        def counted(data: bytes) -> None:
            writes.append(bytes(data))
            real_write(data)

        transport.write = counted  # type: ignore[method-assign]
        reply = await d.expect_after("EHLO one-write", "250 HELP")
        assert len(writes) == 1, writes
        lines = reply.split("\n")
        assert lines[0].startswith("250-") and len(lines) >= 4
        assert writes[0] == ("\r\n".join(lines) + "\r\n").encode()
        assert await d.reply_after("NOOP") == "250 OK" and len(writes) == 2
    finally:
        await d.close()
