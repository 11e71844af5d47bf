"""The key process: a worker's DKIM private-key steps on a core of their own (issue 17).

An RSA-2048 signature costs ~0.3 ms of CPU alone (bench/signrate.py), about a fifth of a worker's
event-loop time per message in the bench, and the loop holds the GIL: signed there, it is time no
SMTP session is served. A thread does not help (bench/README.md, "Tried and not kept": handing
the GIL back and forth cost more than the overlap gained). A process has its own GIL: the worker
computes the SHA-256 the signature is over (relay.dkimsign.unsigned_field), sends it here, and
writes the field with the answer (relay.dkimsign.signed_field). What crosses is 41 octets one way
and the signature the other; no message, no header. This departs from DESIGN.md's "sign
inline" (measured: bench/README.md, "Kept after that").

:class:`KeyProcess` (in the worker) starts ``python -m relay.signproc`` with one end of a socket
pair as its stdin and stdout, and restarts it when it exits. While it is not running (starting,
restarting, never started because the box has one core) or when it does not answer within
:data:`ANSWER_TIMEOUT`, the worker signs inline as before: no message waits on it or is refused
for it. The child holds the keys it was sent, as the worker does (same user, no file of its own).

Frames, big-endian, on the socket pair:

- to the child: ``K id:u32 len:u32 pem`` (a key, once per key id) and
  ``S request:u32 key:u32 digest:32`` (sign this SHA-256 with that key);
- to the worker: ``request:u32 len:u16 signature`` (``len`` 0: the key step failed, or the key
  id is unknown; the worker then signs inline and gets the error itself).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay import restart
from relay.dkimsign import PrivateKey, private_key_step

log = logging.getLogger("relaybox.dkim")

KEY = struct.Struct(">cII")
SIGN = struct.Struct(">cII32s")
ANSWER = struct.Struct(">IH")
ANSWER_TIMEOUT = 2.0  # seconds; past this the worker signs inline (a wedged or starved child)
MAX_PEM = 64 * 1024
MAX_KEYS = 1024


class KeyProcess:
    """The worker's side: ``await sign(ident, pem, digest)`` is the signature, or None (sign
    inline: no child running, no answer in time, or the child could not use the key)."""

    def __init__(
        self, command: Sequence[str] | None = None, *, answer_timeout: float = ANSWER_TIMEOUT
    ) -> None:
        self.command = list(command or [sys.executable, "-I", "-m", "relay.signproc"])
        self.answer_timeout = answer_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0  # children started, for the log and the tests
        self.answered = 0  # signatures the child made
        self._transport: asyncio.Transport | None = None
        self._keys: dict[bytes, int] = {}
        # request -> (future, when sent); insertion order is sending order: the first is oldest
        self._pending: dict[int, tuple[asyncio.Future[bytes | None], float]] = {}
        self._next = 0
        self._buffer = b""
        self._watchdog: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._generation = 0
        self.mode = "auto"

    @property
    def running(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def takes(self, key: PrivateKey) -> bool:
        """Whether this key's steps go to the child (an Ed25519 step, ~0.05 ms, costs less than
        the trip there; with ``dkim_signing = "process"`` they go anyway)."""
        return self.mode == "process" or isinstance(key, rsa.RSAPrivateKey)

    def configure(self, mode: str, workers: int = 1) -> None:
        """``dkim_signing`` (relay.config): start the child or stop it, at start and on reload.
        "auto" runs it when the box has a CPU to spare beside the ``workers`` event loops: with
        one worker per core the children only add their trips (bench/README.md, "Kept after
        that": workers = 2 on 2 cores, 0.89-0.96x inline)."""
        self.mode = mode
        if mode == "process" or (mode == "auto" and usable_cpus() > workers):
            self.start()
        elif self._task is not None:
            self._generation += 1  # the running task ends once its child has (it is not waited)
            self._lost()  # end of file: the child exits
            self._task = None

    def start(self) -> None:
        """Start the child (and keep it running) in the background; signing is inline until
        it is up."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(self._generation), name="relaybox-keys")

    async def stop(self) -> None:
        """End of file to the child (it exits), answers in flight go inline. Idempotent."""
        self._generation += 1
        self._lost()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 2.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def sign(self, ident: bytes, pem: bytes, digest: bytes) -> bytes | None:
        """The private-key step over ``digest`` with the key ``pem`` (``ident``: its SHA-256)."""
        transport = self._transport
        if transport is None or transport.is_closing() or len(digest) != 32 or len(pem) > MAX_PEM:
            return None
        key = self._keys.get(ident)
        if key is None:
            if len(self._keys) >= MAX_KEYS:  # as the Signer's cache: a bound, refilled on use
                self._keys.clear()
            key = self._keys[ident] = len(self._keys) + 1
            transport.write(KEY.pack(b"K", key, len(pem)) + pem)
        self._next = (self._next + 1) & 0xFFFFFFFF
        request = self._next
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | None] = loop.create_future()
        self._pending[request] = (future, loop.time())
        transport.write(SIGN.pack(b"S", request, key, digest))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.answer_timeout, self._watch)
        return await future

    def _watch(self) -> None:
        """No answer to the oldest request within the timeout: the child is wedged or starved.
        It is killed (and started again); what it holds goes inline."""
        self._watchdog = None
        if not self._pending:
            return
        loop = asyncio.get_running_loop()
        _future, sent = next(iter(self._pending.values()))
        late = loop.time() - sent
        if late < self.answer_timeout:
            self._watchdog = loop.call_later(self.answer_timeout - late, self._watch)
            return
        log.error(
            "DKIM key process gave no answer in %.1f s: killed, %d signatures made inline",
            self.answer_timeout, len(self._pending),
        )  # fmt: skip
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        self._lost()

    def _received(self, data: bytes) -> None:
        buf = self._buffer + data if self._buffer else data
        pos = 0
        while len(buf) - pos >= ANSWER.size:
            request, length = ANSWER.unpack_from(buf, pos)
            end = pos + ANSWER.size + length
            if len(buf) < end:
                break
            entry = self._pending.pop(request, None)
            if entry is not None and not entry[0].done():
                entry[0].set_result(buf[pos + ANSWER.size : end] or None)
                self.answered += length > 0
            pos = end
        self._buffer = buf[pos:]

    def _lost(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._keys.clear()
        self._buffer = b""
        pending, self._pending = self._pending, {}
        for future, _sent in pending.values():
            if not future.done():
                future.set_result(None)

    async def _run(self, generation: int) -> None:
        """Keep a child running until :meth:`stop` or a ``configure`` that wants none (each
        moves the generation on: a task of an older one ends with its child)."""
        await restart.keep_running(
            lambda: self._once(generation),
            lambda: generation != self._generation,
            log, "DKIM key process", "signing inline",
        )  # fmt: skip

    async def _once(self, generation: int) -> int:
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=theirs.fileno(), stdout=theirs.fileno()
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.proc = proc
        self.started += 1
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[None] = loop.create_future()
        try:
            transport, _protocol = await loop.create_unix_connection(
                lambda: _Protocol(self, closed), sock=ours
            )
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        if generation == self._generation:  # not stopped meanwhile
            self._transport = transport
            log.info("DKIM key process started pid=%d", proc.pid)
        else:
            transport.close()  # end of file: it exits
        try:
            await closed
        finally:
            transport.close()
            if self._transport is transport:  # gone by itself (not stopped, not killed)
                self._lost()
        return await proc.wait()


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: KeyProcess, closed: asyncio.Future[None]) -> None:
        self._owner = owner
        self._closed = closed

    def data_received(self, data: bytes) -> None:
        self._owner._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _load(pem: bytes) -> PrivateKey | None:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        return None
    return key if isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) else None


def serve(fd_in: int = 0, fd_out: int = 1) -> int:
    """The child: answers frames until end of file (its worker gone or stopping)."""
    keys: dict[int, PrivateKey | None] = {}
    buf = b""
    while True:
        data = os.read(fd_in, 1 << 16)
        if not data:
            return 0
        buf += data
        pos = 0
        while len(buf) - pos >= KEY.size:
            kind = buf[pos : pos + 1]
            if kind == b"K":
                _k, ident, length = KEY.unpack_from(buf, pos)
                if length > MAX_PEM:
                    return 1
                if len(buf) - pos < KEY.size + length:
                    break
                keys[ident] = _load(buf[pos + KEY.size : pos + KEY.size + length])
                pos += KEY.size + length
            elif kind == b"S":
                if len(buf) - pos < SIGN.size:
                    break
                _k, request, ident, digest = SIGN.unpack_from(buf, pos)
                pos += SIGN.size
                key = keys.get(ident)
                signature = b""
                if key is not None:
                    try:
                        signature = private_key_step(key, digest)
                    except ValueError:
                        signature = b""
                _write_all(fd_out, ANSWER.pack(request, len(signature)) + signature)
            else:
                return 1  # not our worker speaking
        buf = buf[pos:]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> int:
    # Its worker stops it (end of file): a SIGTERM or Ctrl-C meant for the whole service must not
    # kill it with a traceback while the worker still sends it work.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        return serve()
    except OSError:  # the worker's end is gone mid-write
        return 0


if __name__ == "__main__":
    sys.exit(main())
