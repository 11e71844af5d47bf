"""Store faults through the whole relay: a database locked by a long CLI transaction, a full
disk, a database that refuses writes (issue 6, item 4).

The promise under test: a 250 after DATA means the message is in the spool, and a fault is a
temporary 451 4.3.0 (never a 250 for what was not stored, never exception text); once the fault
is gone, the next attempt is accepted. After every step the spool's contents are compared with
the queue ids the client was given.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import replies
from relay.clock import ManualClock
from relay.config import Config
from relay.store import db as db_mod
from relay.store import usage
from tests.dialogue import Dialogue
from tests.hostile.kit import LOGIN, authed, message, queued, started, stopped
from tests.relayserver import RelayHandle

TEMP_FAILURE = str(replies.TEMP_FAILURE)


async def send(d: Dialogue, tag: str, body: bytes = b"") -> str:
    """One transaction on an open session; the final reply."""
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
    await d.expect_after("RCPT TO:<bob@dest.test>", "250")
    await d.expect_after("DATA", "354")
    d.send_raw(message(subject=tag, body=body) + b".\r\n")
    await d.writer.drain()
    return await d.reply(within=30)


def queue_id(reply: str) -> str:
    assert reply.startswith("250 2.0.0 queued as "), reply
    return reply.rsplit(" ", 1)[1]


async def spool_ids(relay: RelayHandle) -> list[str]:
    return sorted(m.id for m in await queued(relay))


@contextlib.contextmanager
def cli_write_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """What a long CLI transaction does: BEGIN IMMEDIATE on a separate connection, held."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("ROLLBACK")
    finally:
        conn.close()


@pytest.fixture
async def quick_busy(
    relay_cfg: Config,
    tls_files: tuple[Path, Path, Path],
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> RelayHandle:
    """A relay whose SQLite connections give up on a held lock after 200 ms, not 5 s."""
    monkeypatch.setattr(db_mod, "BUSY_TIMEOUT_MS", 200)
    relay = await started(relay_cfg, tls_files, clock)
    yield relay  # type: ignore[misc]
    await stopped(relay)


async def test_spool_locked_by_a_cli_transaction(quick_busy: RelayHandle) -> None:
    relay = quick_busy
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    first = queue_id(await send(d, "before"))
    with cli_write_lock(relay.server.cfg.spool_path(0)):
        assert await send(d, "while locked") == TEMP_FAILURE
        assert await send(d, "still locked") == TEMP_FAILURE
        assert await spool_ids(relay) == [first]  # reads go on under WAL
    second = queue_id(await send(d, "after"))
    assert await spool_ids(relay) == sorted([first, second])
    await d.close()
    # Each refused message was admitted (counted) while it was signed, and taken back when its
    # enqueue failed: the user's counts hold the two queued ones only.
    assert await counts(relay) == usage.Counts(2, 2, 2)


async def counts(relay: RelayHandle) -> usage.Counts:
    assert relay.server.usage_db is not None
    return await usage.snapshot(relay.server.usage_db, LOGIN, relay.server.clock())


async def test_counts_locked_is_a_temporary_failure_and_nothing_is_queued(
    quick_busy: RelayHandle,
) -> None:
    """The admission (usage.db) runs while the message is signed: when it cannot be written,
    the signed message is not queued, and the reply is the same 451 4.3.0."""
    relay = quick_busy
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    first = queue_id(await send(d, "before"))
    with cli_write_lock(relay.server.cfg.usage_path):
        assert await send(d, "while locked") == TEMP_FAILURE
    assert await spool_ids(relay) == [first]
    second = queue_id(await send(d, "after"))
    assert await spool_ids(relay) == sorted([first, second])
    assert await counts(relay) == usage.Counts(2, 2, 2)
    await d.close()


async def test_main_database_locked_does_not_stop_submission(quick_busy: RelayHandle) -> None:
    """AUTH, the revocation check at MAIL and the domain lookup only read the shared database:
    a CLI holding its write lock (say, a slow `user add`) does not hold up mail."""
    relay = quick_busy
    password = await relay.add_user(LOGIN)
    with cli_write_lock(relay.server.cfg.db_path):
        d = await authed(relay, password)
        msg_id = queue_id(await send(d, "main db locked"))
        await d.close()
    assert await spool_ids(relay) == [msg_id]


def _largest_file(directory: Path) -> int:
    return max(p.stat().st_size for p in directory.iterdir() if p.is_file())


async def test_disk_full_is_a_temporary_failure(relay: RelayHandle) -> None:
    """The spool's files cannot grow (RLIMIT_FSIZE: writes past it fail with EFBIG, which SQLite
    reports as a full disk). Works unprivileged and on any filesystem, unlike a tiny tmpfs; root
    ignores file modes, so a chmod would prove nothing."""
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    first = queue_id(await send(d, "before"))
    state = relay.server.cfg.state_dir
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    big = b"f" * 998 + b"\r\n"
    try:
        # Python ignores SIGXFSZ, so a write over the limit fails instead of killing us.
        resource.setrlimit(resource.RLIMIT_FSIZE, (_largest_file(state) + 4096, hard))
        assert await send(d, "disk full", big * 300) == TEMP_FAILURE
        assert await send(d, "still full", big * 300) == TEMP_FAILURE
        # Below SPILL_AT the message is held, and the spool's write is what fails; above it the
        # body's file on disk fails first (relay/smtp/spill.py): the same reply either way.
        assert await send(d, "held, full", big * 100) == TEMP_FAILURE
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert await spool_ids(relay) == [first]
    second = queue_id(await send(d, "after", big * 300))
    assert await spool_ids(relay) == sorted([first, second])
    await d.close()


def _immutable(path: Path, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True, capture_output=True)


def _chattr_works(probe: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    probe.write_bytes(b"x")
    try:
        _immutable(probe, True)
    except subprocess.CalledProcessError:
        return False
    _immutable(probe, False)
    return True


async def test_read_only_spool_is_a_temporary_failure(relay: RelayHandle, tmp_path: Path) -> None:
    """The spool files turn read-only under a running server (the immutable attribute: unlike
    file modes it stops root too, and stops writes through descriptors already open)."""
    if not _chattr_works(tmp_path / "probe"):
        pytest.skip("this filesystem has no immutable attribute (chattr +i)")
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    first = queue_id(await send(d, "before"))
    state = relay.server.cfg.state_dir
    # The -shm index is mmap()ed by SQLite: a fault there is a SIGBUS, not an I/O error, and no
    # filesystem turns it read-only under a running writer; the database and its WAL it can.
    files = [state / "spool-0.db", state / "spool-0.db-wal"]
    assert all(f.exists() for f in files), files
    try:
        for f in files:
            _immutable(f, True)
        assert await send(d, "read-only") == TEMP_FAILURE
        assert await send(d, "still read-only") == TEMP_FAILURE
    finally:
        for f in files:
            _immutable(f, False)
    assert await spool_ids(relay) == [first]
    second = queue_id(await send(d, "writable again"))
    assert await spool_ids(relay) == sorted([first, second])
    await d.close()
