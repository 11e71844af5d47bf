"""The key process (relay/signproc.py): DKIM private-key steps in a child of the worker (issue 17).

Real child processes throughout (``python -m relay.signproc``). What is shown: its signatures are
the ones the worker would make itself, byte for byte, and verify; which keys go there ("auto":
RSA only); a child killed, wedged (SIGSTOP) or handed a key it cannot use costs no message its
signature (the worker signs inline at once) and is started again; a stranger's frame ends it,
Ctrl-C does not, end of file does; and through ``relaybox serve``: the child runs by default on a
box of more than one core and not with ``dkim_signing = "inline"``, a reload starts and stops it,
mail it signed verifies at the receiving end, and nothing is left behind at SIGTERM.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from relay import config as config_mod
from relay import dkim as relay_dkim
from relay import dkimkeys, dkimsign, restart, signproc
from relay.dkim import Signer
from relay.signproc import KeyProcess
from relay.store import domains, shared
from relay.store.domains import SigningKey
from tests import leaks
from tests.dkimref import t_tag
from tests.faults.procserver import ServerProcess
from tests.hostile.kit import LOGIN, clean
from tests.serverconf import smarthost, write_serve_config
from tests.sink import Sink
from tests.test_webhook_process import alive, children, cmdline, gone, send_one
from tests.userhelpers import seed_user

MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n"
WITHIN = 20.0


@pytest.fixture(scope="module")
def pairs() -> dict[str, dkimkeys.KeyPair]:
    made = {kind: dkimkeys.generate(kind) for kind in ("rsa", "ed25519")}
    for pair in made.values():
        leaks.add(pair.private_pem)
    return made


def signing_key(pairs: dict[str, dkimkeys.KeyPair], kind: str = "rsa") -> SigningKey:
    return SigningKey("example.com", "sel", kind, pairs[kind].private_pem)


def verifies(signed: bytes, key: SigningKey, pair: dkimkeys.KeyPair) -> bool:
    name = relay_dkim.key_name(key.domain, key.selector)
    records = {name: dkimkeys.txt_value(key.algorithm, pair.public_b64)}
    return relay_dkim.verify(signed, records).result == "pass"


async def until(check: Callable[[], object], within: float = WITHIN) -> None:
    async with asyncio.timeout(within):
        while True:  # no event to wait on: another process's start or end
            if check():
                return
            await asyncio.sleep(0.02)  # sleep-ok: polling for another process


@pytest.fixture
async def keys() -> AsyncIterator[KeyProcess]:
    process = KeyProcess(answer_timeout=0.5)
    process.configure("process")
    await until(lambda: process.running)
    try:
        yield process
    finally:
        await process.stop()


async def test_the_childs_steps_are_the_workers_byte_for_byte(
    keys: KeyProcess, pairs: dict[str, dkimkeys.KeyPair]
) -> None:
    for kind in ("rsa", "ed25519"):
        key = signing_key(pairs, kind)
        loaded = Signer()._key(key)[2]
        pem = key.private_pem.encode()
        for i in range(20):
            digest = hashlib.sha256(b"%d" % i).digest()
            got = await keys.sign(hashlib.sha256(pem).digest(), pem, digest)
            assert got == dkimsign.private_key_step(loaded, digest)  # what the worker would make
    assert keys.answered == 40

    # Whole messages: the same field as signed inline, and it verifies.
    signer = Signer(key_process=keys)
    inline = Signer()
    for kind in ("rsa", "ed25519"):
        key = signing_key(pairs, kind)
        for _ in range(3):  # t= is the second: sign again if it turned between the two
            ours = await signer.sign_async(MESSAGE, key)
            theirs = inline.sign(MESSAGE, key)
            if t_tag(ours) == t_tag(theirs):
                break
        assert ours == theirs
        assert verifies(ours, key, pairs[kind])
    assert keys.answered == 42


async def test_auto_sends_rsa_steps_and_signs_ed25519_inline(
    keys: KeyProcess, pairs: dict[str, dkimkeys.KeyPair]
) -> None:
    keys.mode = "auto"
    signer = Signer(key_process=keys)
    signed = await signer.sign_async(MESSAGE, signing_key(pairs, "ed25519"))
    assert verifies(signed, signing_key(pairs, "ed25519"), pairs["ed25519"])
    assert keys.answered == 0
    signed = await signer.sign_async(MESSAGE, signing_key(pairs, "rsa"))
    assert verifies(signed, signing_key(pairs, "rsa"), pairs["rsa"])
    assert keys.answered == 1


async def test_many_at_once_each_gets_its_own_signature(
    keys: KeyProcess, pairs: dict[str, dkimkeys.KeyPair]
) -> None:
    signer = Signer(key_process=keys)
    key = signing_key(pairs)
    messages = [MESSAGE.replace(b"body", b"body %d" % i) for i in range(64)]
    signed = await asyncio.gather(*(signer.sign_async(m, key) for m in messages))
    for message, result in zip(messages, signed, strict=True):
        assert result.endswith(message)
        assert verifies(result, key, pairs["rsa"])
    assert keys.answered == 64


async def test_a_killed_child_costs_no_signature_and_is_started_again(
    keys: KeyProcess, pairs: dict[str, dkimkeys.KeyPair], caplog: pytest.LogCaptureFixture
) -> None:
    signer = Signer(key_process=keys)
    key = signing_key(pairs)
    assert keys.proc is not None
    first = keys.proc.pid
    os.kill(first, signal.SIGKILL)
    # Whatever the worker sees first (the socket closed or not yet), every message is signed.
    for _ in range(5):
        assert verifies(await signer.sign_async(MESSAGE, key), key, pairs["rsa"])
    await until(lambda: keys.started == 2 and keys.running)
    assert keys.proc.pid != first
    before = keys.answered
    assert verifies(await signer.sign_async(MESSAGE, key), key, pairs["rsa"])
    assert keys.answered == before + 1  # the new child has the key again (sent anew)
    assert "DKIM key process exited" in caplog.text


async def test_a_wedged_child_is_killed_and_its_work_done_inline(
    keys: KeyProcess, pairs: dict[str, dkimkeys.KeyPair], caplog: pytest.LogCaptureFixture
) -> None:
    signer = Signer(key_process=keys)
    key = signing_key(pairs)
    assert keys.proc is not None
    wedged = keys.proc
    os.kill(wedged.pid, signal.SIGSTOP)
    began = time.monotonic()
    async with asyncio.timeout(WITHIN):  # without the watchdog: no answer, ever
        signed = await asyncio.gather(*(signer.sign_async(MESSAGE, key) for _ in range(4)))
    assert time.monotonic() - began < keys.answer_timeout + 2.0
    assert all(verifies(s, key, pairs["rsa"]) for s in signed)
    assert keys.answered == 0
    assert await asyncio.wait_for(wedged.wait(), WITHIN) == -signal.SIGKILL
    assert "gave no answer in 0.5 s: killed, 4 signatures made inline" in caplog.text
    await until(lambda: keys.started == 2 and keys.running)


async def test_stopped_and_started_at_once_leaves_one_child(
    keys: KeyProcess, pairs: dict[str, dkimkeys.KeyPair]
) -> None:
    """A reload to "inline" and straight back (two SIGHUPs): the first child ends at end of file,
    one other starts, and the first one's task starts no third."""
    first = keys.proc
    assert first is not None
    keys.configure("inline")
    assert not keys.running
    keys.configure("process")
    await until(lambda: keys.started == 2 and keys.running)
    assert await asyncio.wait_for(first.wait(), WITHIN) == 0
    await asyncio.sleep(restart.RESTART_DELAY + 0.5)  # sleep-ok: what the old task would take
    assert keys.started == 2 and keys.running
    key = signing_key(pairs)
    assert verifies(await Signer(key_process=keys).sign_async(MESSAGE, key), key, pairs["rsa"])
    assert keys.answered == 1


async def test_a_key_the_child_cannot_use_is_answered_empty(
    keys: KeyProcess, pairs: dict[str, dkimkeys.KeyPair]
) -> None:
    digest = hashlib.sha256(b"x").digest()
    garbage = b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    assert await keys.sign(b"g" * 32, garbage, digest) is None
    assert await keys.sign(b"g" * 32, garbage, b"short") is None  # not even sent
    # The same child goes on with a key it can use.
    pem = pairs["rsa"].private_pem.encode()
    got = await keys.sign(hashlib.sha256(pem).digest(), pem, digest)
    assert got == dkimsign.private_key_step(Signer()._key(signing_key(pairs))[2], digest)
    assert keys.started == 1 and keys.running


def child() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-I", "-m", "relay.signproc"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_strangers_frame_ends_the_child() -> None:
    proc = child()
    out, err = proc.communicate(b"X" + bytes(40), timeout=WITHIN)
    assert proc.returncode == 1 and out == b"" and err == b""
    proc = child()  # a key too large to be one of ours
    out, err = proc.communicate(signproc.KEY.pack(b"K", 1, 1 << 30), timeout=WITHIN)
    assert proc.returncode == 1 and out == b"" and err == b""


def test_the_child_ignores_ctrl_c_and_ends_at_end_of_file(
    pairs: dict[str, dkimkeys.KeyPair],
) -> None:
    proc = child()
    assert proc.stdin is not None and proc.stdout is not None
    pem = pairs["ed25519"].private_pem.encode()
    proc.stdin.write(signproc.KEY.pack(b"K", 7, len(pem)) + pem)
    proc.stdin.write(signproc.SIGN.pack(b"S", 99, 7, bytes(32)))
    proc.stdin.write(signproc.SIGN.pack(b"S", 100, 8, bytes(32)))  # no such key: empty
    proc.stdin.flush()
    head = proc.stdout.read(signproc.ANSWER.size)
    request, length = signproc.ANSWER.unpack(head)
    assert (request, length) == (99, 64)
    signature = proc.stdout.read(length)
    assert proc.stdout.read(signproc.ANSWER.size) == struct.pack(">IH", 100, 0)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        proc.send_signal(sig)
    time.sleep(0.2)  # sleep-ok: giving a signal time to be (not) acted on
    assert proc.poll() is None
    out, err = proc.communicate(b"", timeout=WITHIN)
    assert proc.returncode == 0 and out == b"" and err == b""
    loaded = Signer()._key(signing_key(pairs, "ed25519"))[2]
    assert signature == dkimsign.private_key_step(loaded, bytes(32))


# --- through relaybox serve ------------------------------------------------------------------


def key_children(pid: int) -> list[int]:
    return [c for c in children(pid) if "relay.signproc" in cmdline(c)]


async def delivered_verifies(sink: Sink, count: int, cfg: config_mod.Config) -> None:
    received = await sink.wait_received(count)
    db = await shared.open_main(cfg)
    try:
        domain = await domains.get(db, LOGIN.rpartition("@")[2])
    finally:
        await db.close()
    assert domain is not None
    name = relay_dkim.key_name(domain.name, domain.dkim_selector)
    records = {name: dkimkeys.txt_value(domain.dkim_algorithm, domain.dkim_public_key)}
    for item in received[:count]:
        assert relay_dkim.verify(item.data, records).result == "pass"


@pytest.mark.skipif(signproc.usable_cpus() < 2, reason="auto runs no key process on one core")
async def test_serve_signs_in_a_key_process_by_default_and_not_inline(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    path = write_serve_config(tmp_path, tls_files, delivery=smarthost(sink.port))
    cfg = config_mod.load(path)
    assert cfg.dkim_signing == "auto" and cfg.dns.dkim_key_type == "rsa"
    password = await seed_user(cfg, LOGIN, now=time.time())
    ctx = ssl.create_default_context(cafile=str(tls_files[2]))
    server = ServerProcess(path, listeners=1)
    try:
        await server.start()
        assert server.proc is not None
        await server.wait_for_line("DKIM key process started")
        [first] = key_children(server.proc.pid)
        assert cmdline(first)[-2:] == ["-m", "relay.signproc"]
        await send_one(server.ports["tls"], ctx, password, "one@dest.test")
        await delivered_verifies(sink, 1, cfg)

        # Killed: the next message is signed all the same, and another child starts.
        os.kill(first, signal.SIGKILL)
        await server.wait_for_line("DKIM key process exited")
        await send_one(server.ports["tls"], ctx, password, "two@dest.test")
        await delivered_verifies(sink, 2, cfg)
        await until(lambda: [c for c in key_children(server.proc.pid) if c != first])
        [second] = key_children(server.proc.pid)

        # A reload to "inline" stops it; back to "process" starts one.
        path.write_text('dkim_signing = "inline"\n' + path.read_text())
        server.signal(signal.SIGHUP)
        await server.wait_for_line("reloaded")
        await gone(second)
        assert key_children(server.proc.pid) == []
        await send_one(server.ports["tls"], ctx, password, "three@dest.test")
        await delivered_verifies(sink, 3, cfg)
        path.write_text(path.read_text().replace('"inline"', '"process"'))
        server.signal(signal.SIGHUP)
        await until(lambda: key_children(server.proc.pid))
        [third] = key_children(server.proc.pid)
        await send_one(server.ports["tls"], ctx, password, "four@dest.test")
        await delivered_verifies(sink, 4, cfg)

        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
        assert not alive(third)  # stopped with its worker, not left behind
    finally:
        await server.ensure_stopped()
    for line in server.lines:
        clean(line, "server log")
    assert not any("Traceback" in line for line in server.lines)


async def test_inline_runs_no_key_process(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    path = write_serve_config(tmp_path, tls_files, delivery=smarthost(sink.port))
    path.write_text('dkim_signing = "inline"\n' + path.read_text())
    cfg = config_mod.load(path)
    password = await seed_user(cfg, LOGIN, now=time.time())
    ctx = ssl.create_default_context(cafile=str(tls_files[2]))
    server = ServerProcess(path, listeners=1)
    try:
        await server.start()
        assert server.proc is not None
        await send_one(server.ports["tls"], ctx, password, "one@dest.test")
        await delivered_verifies(sink, 1, cfg)
        assert key_children(server.proc.pid) == []
        assert not [line for line in server.lines if "DKIM key process" in line]
        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        await server.ensure_stopped()


async def test_auto_runs_no_child_without_a_cpu_to_spare() -> None:
    cpus = signproc.usable_cpus()
    keys = KeyProcess()
    try:
        keys.configure("auto", workers=cpus)  # a worker per core: no room for it
        assert keys._task is None and not keys.running
        keys.configure("inline")
        assert keys._task is None
        if cpus > 1:
            keys.configure("auto", workers=cpus - 1)
            await until(lambda: keys.running)
            keys.configure("auto", workers=cpus)  # a reload that raised workers: it stops
            assert not keys.running and keys._task is None
    finally:
        await keys.stop()


def test_dkim_signing_takes_three_values(tmp_path: Path) -> None:
    for value in ("auto", "process", "inline"):
        path = tmp_path / f"{value}.toml"
        path.write_text(f'dkim_signing = "{value}"\n')
        assert config_mod.load(path).dkim_signing == value
    path = tmp_path / "bad.toml"
    path.write_text('dkim_signing = "thread"\n')
    with pytest.raises(config_mod.ConfigError, match="dkim_signing"):
        config_mod.load(path)
