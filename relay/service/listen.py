"""Listening sockets and their accept loop: what ``loop.create_server`` does, minus two faults.

- Every accepted connection becomes a plain transport at once, so the session counts it from
  accept; on the implicit-TLS listener the session then does the handshake itself
  (relay/smtp/tls.py). ``create_server(ssl=...)`` shows the protocol a connection only once its
  handshake is done: silent clients held a place each, uncounted, for asyncio's default 60 s.
- Out of file descriptors (EMFILE, ENFILE; ENOBUFS, ENOMEM alike), asyncio 3.11's accept loop
  logs the error with a traceback on every try, up to ``backlog`` tries per wakeup, and arms a
  retry for each: 238,760 lines in 3 s with 60 silent clients and 40 descriptors (measured).
  Here the listener stops accepting for :data:`ACCEPT_BACKOFF` and says so at most once per
  :data:`LOG_INTERVAL`, with a count of the pauses in between. What is open goes on meanwhile;
  new clients wait in the kernel's backlog and are taken once descriptors are free again.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
from collections.abc import Callable, Sequence

from relay import maillog
from relay.loglimit import LogLimit
from relay.service import proxyproto

log = logging.getLogger("relaybox.server")

ACCEPT_BATCH = 64  # connections taken per wakeup before other work gets the loop again
ACCEPT_BACKOFF = 0.5  # seconds without accepting once out of descriptors (or memory)
LOG_INTERVAL = 10.0  # at most one line per interval about it, per listener
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


async def bind(host: str, port: int, *, reuse_port: bool, backlog: int) -> list[socket.socket]:
    """Listening sockets for ``host:port``, one per address it resolves to (as create_server)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )  # fmt: skip
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # workers share the port; the kernel spreads clients
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # as create_server: the IPv4 address binds its own
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"error while attempting to bind on address {address!r}: "
                    f"{(exc.strerror or str(exc)).lower()}",
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listening:
    """Accepts on ``sockets`` and hands each connection to ``factory()`` as a plain transport."""

    def __init__(
        self,
        sockets: list[socket.socket],
        factory: Callable[[proxyproto.Address | None], asyncio.Protocol],
        *,
        shortage_log: LogLimit | None = None,
        trusted_proxies: Sequence[str] = (),
    ) -> None:
        """``factory(client)``: the protocol of a new connection; ``client`` is the address a
        PROXY header gave (None: the socket's peer is the client). ``trusted_proxies``: on a
        ``proxy_protocol`` listener, the balancers whose connections begin with a header
        (relay/service/proxyproto.py); empty: no PROXY protocol. ``shortage_log``: shared by the
        listeners of a process, so that running out of descriptors is said once per interval
        for all of them."""
        self.sockets = sockets
        self._factory = factory
        self._trusted = tuple(trusted_proxies)
        self._proxy_log = LogLimit(5, LOG_INTERVAL)
        self._loop = asyncio.get_running_loop()
        self._serving = False
        self._resume: dict[int, asyncio.TimerHandle] = {}
        self._pending: set[asyncio.Task[object]] = set()
        self._limit = shortage_log or LogLimit(1, LOG_INTERVAL)

    def start(self) -> None:
        self._serving = True
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and close the listening sockets (open connections are the gate's)."""
        self._serving = False
        for handle in self._resume.values():
            handle.cancel()
        self._resume.clear()
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # nothing more waiting
            except ConnectionAbortedError:
                continue  # the client gave up while in the backlog
            except OSError as exc:
                self._pause(sock, exc)
                return
            conn.setblocking(False)
            peer = str(address[0]) if isinstance(address, tuple) else ""
            if self._trusted and proxyproto.trusted(peer, self._trusted):
                start = self._proxied(conn, (peer, int(address[1])))
            else:
                start = self._loop.connect_accepted_socket(lambda: self._factory(None), conn)
            task: asyncio.Task[object] = self._loop.create_task(start)
            self._pending.add(task)
            task.add_done_callback(functools.partial(self._connected, conn))

    async def _proxied(self, conn: socket.socket, peer: proxyproto.Address) -> object:
        """A trusted balancer's connection: its header first, then the session for the client
        it names. Without a valid header in time, closed before any greeting."""
        try:
            client = await proxyproto.read_header(conn, peer)
        except (proxyproto.ProxyError, TimeoutError, OSError) as exc:
            why = "timeout" if isinstance(exc, TimeoutError) else str(exc)
            self._proxy_log.report(
                lambda: log.info("proxy refused ip=%s reason=%s", peer[0], maillog.safe(why)),
                lambda n: log.info("proxy refused %d more in the last %.0fs", n, LOG_INTERVAL),
            )
            conn.close()
            return None
        return await self._loop.connect_accepted_socket(lambda: self._factory(client), conn)

    def _connected(self, conn: socket.socket, task: asyncio.Task[object]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("an accepted connection did not start: %s", task.exception())
            conn.close()

    def _pause(self, sock: socket.socket, exc: OSError) -> None:
        """Stop accepting on ``sock`` for ACCEPT_BACKOFF: the kernel keeps reporting it ready
        while no descriptor is free, and every try would fail the same way."""
        self._loop.remove_reader(sock.fileno())
        self._resume[sock.fileno()] = self._loop.call_later(ACCEPT_BACKOFF, self._restart, sock)
        name = errno.errorcode.get(exc.errno or 0, "error")
        why = f"{name} ({os.strerror(exc.errno) if exc.errno else exc})"
        host, port = sock.getsockname()[:2]
        where = f"{host}:{port}"
        if exc.errno not in _RESOURCE_ERRNOS:
            why += ", not a resource shortage"

        def line() -> None:
            log.error(
                "accept on %s failed: %s; not accepting for %.1fs at a time (connections "
                "already open go on)", where, why, ACCEPT_BACKOFF,
            )  # fmt: skip

        def summary(count: int) -> None:
            log.error(
                "accepting paused %d more times in the last %.0fs (last on %s): %s",
                count, self._limit.interval, where, why,
            )  # fmt: skip

        self._limit.report(line, summary)

    def _restart(self, sock: socket.socket) -> None:
        self._resume.pop(sock.fileno(), None)
        if self._serving and sock.fileno() >= 0:
            self._loop.add_reader(sock.fileno(), self._accept, sock)
