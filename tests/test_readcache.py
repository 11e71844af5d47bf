"""Answers kept by relay/store/readcache.py: the credential recheck at MAIL FROM and the
suppression list at RCPT TO are read again after any write to the main store, by any process.

The store is a real SQLite file; the other processes are real ones (a second Python process
moving the generation; ``relaybox serve`` with two workers and the ``relaybox`` CLI as separate
processes, for the promise itself: a revocation or a suppression the CLI has returned from holds
at the next command of a session already open on either worker).
"""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.config import Config
from relay.store import shared, suppressions
from relay.store.db import StoreError
from relay.store.engine import SqliteStore, Store
from relay.store.readcache import Generation, ReadCache, generation_path
from tests.dialogue import Dialogue
from tests.sink import Sink
from tests.test_workers import LOGIN, queued_in, workers_running


@pytest.fixture
async def store(relay_cfg: Config) -> AsyncIterator[Store]:
    db = await shared.open_main(relay_cfg)
    await write(db, "0")
    yield db
    await db.close()


async def write(db: Store, value: str) -> None:
    async with db.transaction() as tx:
        await tx.execute("CREATE TABLE IF NOT EXISTS probe (k TEXT PRIMARY KEY, v TEXT)")
        await tx.execute("INSERT OR REPLACE INTO probe VALUES ('k', ?)", (value,))


class Reader:
    """The read a cache keeps: the probe's value, counted."""

    def __init__(self, db: Store) -> None:
        self.db = db
        self.count = 0
        self.hold: asyncio.Event | None = None  # set: the read waits for it after reading
        self.selected = asyncio.Event()  # its SELECT has returned

    async def __call__(self) -> str:
        self.count += 1
        row = await self.db.fetchone("SELECT v FROM probe WHERE k = 'k'")
        assert row is not None
        self.selected.set()
        if self.hold is not None:
            await self.hold.wait()
        return str(row["v"])


async def test_an_answer_is_kept_until_the_store_is_written(store: Store) -> None:
    cache: ReadCache[str, str] = ReadCache(store.generation)
    read = Reader(store)
    assert [await cache.get("k", read) for _ in range(5)] == ["0"] * 5
    assert read.count == 1 and (cache.lookups, cache.reads) == (5, 1)
    await write(store, "1")
    assert await cache.get("k", read) == "1"
    assert read.count == 2
    # every kind of write moves it: a writing statement, a read-then-write
    await store.write_fetchall("UPDATE probe SET v = '2' RETURNING v")
    assert await cache.get("k", read) == "2"
    await store.read_then_write(
        "SELECT v FROM probe", (), lambda rows: (None, [("UPDATE probe SET v = '3'", [()])])
    )
    assert await cache.get("k", read) == "3"
    assert read.count == 4


async def test_a_failed_write_moves_it_too(store: Store) -> None:
    cache: ReadCache[str, str] = ReadCache(store.generation)
    read = Reader(store)
    await cache.get("k", read)
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.execute("UPDATE probe SET v = 'never'")
            raise RuntimeError("rolled back")
    assert await cache.get("k", read) == "0"
    assert read.count == 2


async def test_a_write_by_another_process_is_seen(store: Store, relay_cfg: Config) -> None:
    """The CLI is another process with its own mapping of the file: a value it writes is the
    next one this process compares with."""
    cache: ReadCache[str, str] = ReadCache(store.generation)
    read = Reader(store)
    await cache.get("k", read)
    path = generation_path(relay_cfg.db_path)
    code = (
        "import sys; from pathlib import Path; from relay.store.readcache import Generation; "
        "g = Generation(Path(sys.argv[1])); g.advance(); g.close()"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, str(path))
    assert await proc.wait() == 0
    await cache.get("k", read)
    assert read.count == 2


@pytest.mark.parametrize("observed", [True, False])
async def test_an_answer_read_across_a_commit_is_not_used_after_it(
    store: Store, observed: bool
) -> None:
    """The read saw the old value; the write committed (and moved the generation) before the
    read returned. Whether or not another lookup noticed the move meanwhile, the old value is
    never an answer after the commit."""
    cache: ReadCache[str, str] = ReadCache(store.generation)
    read = Reader(store)
    read.hold = asyncio.Event()
    slow = asyncio.ensure_future(cache.get("k", read))
    await read.selected.wait()
    await write(store, "new")
    if observed:
        other = Reader(store)
        assert await cache.get("other key", other) == "new"
    read.hold.set()
    assert await slow == "0"  # what it read, given to the one caller that asked before
    read.hold = None
    assert await cache.get("k", read) == "new"


async def test_max_age_bounds_what_the_generation_cannot_see(
    store: Store, relay_cfg: Config
) -> None:
    """A write with another tool (sqlite3 on the file) does not move the generation: the kept
    answer is used for max_age at most."""
    now = [100.0]
    cache: ReadCache[str, str] = ReadCache(store.generation, max_age=5.0, clock=lambda: now[0])
    read = Reader(store)
    await cache.get("k", read)
    with sqlite3.connect(relay_cfg.db_path) as conn:
        conn.execute("UPDATE probe SET v = 'behind its back'")
    now[0] += 4.9
    assert await cache.get("k", read) == "0"
    now[0] += 0.2
    assert await cache.get("k", read) == "behind its back"


async def test_without_a_generation_every_lookup_reads(store: Store) -> None:
    """PostgreSQL's store has none (another node's writes cannot reach a file here)."""
    cache: ReadCache[str, str] = ReadCache(None)
    read = Reader(store)
    for _ in range(3):
        await cache.get("k", read)
    assert read.count == 3


async def test_a_failed_read_keeps_nothing_and_the_oldest_goes_first(store: Store) -> None:
    cache: ReadCache[str, str] = ReadCache(store.generation, max_entries=2)

    async def failing() -> str:
        raise StoreError("read failed")

    with pytest.raises(StoreError):
        await cache.get("k", failing)
    read = Reader(store)
    for key in ("a", "b", "c"):
        await cache.get(key, read)
    assert read.count == 3
    await cache.get("c", read)
    await cache.get("b", read)
    assert read.count == 3
    await cache.get("a", read)  # pushed out by "c"
    assert read.count == 4


async def test_a_generation_file_that_cannot_be_opened_is_a_store_error(
    relay_cfg: Config,
) -> None:
    """Writes would not reach the other processes' caches: the store does not open."""
    await (await shared.open_main(relay_cfg)).close()  # the database exists
    path = generation_path(relay_cfg.db_path)
    path.unlink(missing_ok=True)
    path.mkdir()
    with pytest.raises(StoreError, match="cannot open .*relaybox.db-generation"):
        await shared.open_main(relay_cfg)
    with pytest.raises(StoreError):
        Generation(path)


async def test_suppression_lookup_reads_a_clean_domain_once(store: Store) -> None:
    """A domain with no live entry: one read for it, none per address; an entry added makes
    the next RCPT read and refuse; one that lapses lets the address through without a write."""
    assert isinstance(store, SqliteStore)
    lookup = suppressions.Lookup(store)
    now = 1_800_000_000.0
    for i in range(20):
        assert await lookup.check("example.com", f"r{i}@dest.test", now) is None
    assert (lookup.domains.reads, lookup.entries.reads) == (1, 0)
    async with store.transaction() as tx:  # as a bounce with [suppression] ttl = "60s" would
        await tx.execute(
            "INSERT INTO suppressions (domain, address, reason, code, reply, source,"
            " created_at, expires_at)"
            " VALUES ('example.com', 'gone@dest.test', '', '5.1.1', '', 'bounce', ?, ?)",
            (now, now + 60),
        )
    found = await lookup.check("example.com", "gone@dest.test", now)
    assert found is not None and found.address == "gone@dest.test"
    assert await lookup.check("example.com", "gone@dest.test", now + 30) is not None
    assert await lookup.check("example.com", "gone@dest.test", now + 61) is None
    assert lookup.entries.reads == 1


# --- the promise, across processes ----------------------------------------------------------


async def relaybox(cfg_path: Path, *args: str) -> str:
    """The real CLI, a process of its own; its stdout (exit 0 asserted)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "admin.cli",
        "--config",
        str(cfg_path),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def warm_session(port: int, ctx: ssl.SSLContext, password: str, i: int) -> Dialogue:
    """An open session that has sent one message to gone@dest.test: its worker has read (and
    kept) the credentials and the suppression answers."""
    d = await Dialogue.open(port, tls=ctx)
    await d.login(LOGIN, password)
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
    await d.expect_after("RCPT TO:<gone@dest.test>", "250")
    await d.expect_after("DATA", "354")
    msg = f"From: {LOGIN}\r\nTo: gone@dest.test\r\nMessage-ID: <c{i}@example.com>\r\n\r\nhi\r\n."
    await d.expect_after(msg, "250 2.0.0 queued as")
    return d


async def test_the_cli_reaches_sessions_open_on_every_worker(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    async with workers_running(tmp_path, tls_files, sink, paused=True) as run:
        ctx = ssl.create_default_context(cafile=str(tls_files[2]))
        sessions = [await warm_session(run.port, ctx, run.password, i) for i in range(8)]
        spools = [run.cfg.state_dir / f"spool-{w}.db" for w in (0, 1)]
        assert all(queued_in(p) > 0 for p in spools), "the sessions did not reach both workers"
        cfg_path = tmp_path / "relaybox.toml"

        await relaybox(cfg_path, "suppression", "add", "gone@dest.test", "--domain", "example.com")
        for d in sessions:
            await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
            refused = await d.reply_after("RCPT TO:<gone@dest.test>")
            assert refused.startswith("550 5.1.1 <gone@dest.test>: suppressed"), refused
            await d.expect_after("RSET", "250")

        await relaybox(cfg_path, "user", "disable", LOGIN)
        for d in sessions:
            assert (await d.reply_after(f"MAIL FROM:<{LOGIN}>")).startswith("535 5.7.8"), d
            await d.close()
