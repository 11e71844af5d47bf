"""The PROXY protocol (HAProxy's, versions 1 and 2) on a listener: the client's address from the
layer-4 balancer in front of relaybox.

A listener with ``proxy_protocol = true`` takes the header only from its ``trusted_proxies``:

- a connection from a trusted proxy must begin with a header within
  :data:`HEADER_TIMEOUT` seconds; without one (or with a malformed one) it is closed before a
  greeting. The address in the header is the client's for the whole session: the gate's
  per-address counts, AUTH throttling and lockouts, IP allow-lists, the mail log, ``Received:``.
  A v2 ``LOCAL`` header (HAProxy's health checks) and v1 ``UNKNOWN`` keep the proxy's address.
- any other connection is a client speaking to relaybox directly, with its own address; a PROXY
  header it sends is refused: on a STARTTLS listener its first line is a ``PROXY`` command
  (554 5.7.0 and the connection closes, relay/smtp/session.py), on an implicit-TLS listener it is
  not a ClientHello (the handshake fails).

The header is read from the socket before any transport exists, with reads that never go past
its end (v1: a byte at a time up to its CRLF; v2: its 16 bytes, then exactly its length), so what
follows (the ClientHello of an implicit-TLS client, or nothing: SMTP waits for the greeting)
is still in the kernel for the session's transport.

Why not aiosmtpd's own PROXY support (``proxy_protocol_timeout``): it reads the header inside
aiosmtpd's session, after relaybox's implicit-TLS handshake would have run (it cannot precede TLS
on port 465), and it trusts every peer (no list of proxies), so any client could claim any
address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Sequence

HEADER_TIMEOUT = 5.0  # seconds a trusted proxy has to send its header
V1_MAX = 107  # the longest v1 line, CRLF included (the spec's)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX = 16 + 536  # header and the most a well-behaved sender adds (addresses and TLVs)

Address = tuple[str, int]


class ProxyError(Exception):
    """The connection did not begin with a valid PROXY header."""


def trusted(peer_ip: str, networks: Sequence[str]) -> bool:
    """Whether ``peer_ip`` (the socket's peer) is in one of ``networks`` (CIDRs)."""
    try:
        addr = ipaddress.ip_address(peer_ip.partition("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in ipaddress.ip_network(net, strict=False) for net in networks)


def parse_v1(line: bytes, peer: Address) -> Address:
    """``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` -> (SRC, SPORT); ``UNKNOWN``: ``peer``."""
    if not line.endswith(b"\r\n") or len(line) > V1_MAX:
        raise ProxyError("v1 header without its CRLF within 107 bytes")
    try:
        parts = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyError("v1 header is not ASCII") from None
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ProxyError("not a v1 header")
    if parts[1] == "UNKNOWN":
        return peer
    if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
        raise ProxyError("v1 header: expected TCP4, TCP6 or UNKNOWN and four fields")
    _proto, src, _dst, sport, _dport = parts[1:]
    try:
        ip = ipaddress.ip_address(src)
        port = int(sport)
    except ValueError:
        raise ProxyError("v1 header: bad source address or port") from None
    if (ip.version == 4) != (parts[1] == "TCP4") or not 0 <= port <= 65535:
        raise ProxyError("v1 header: the address does not match its family")
    return str(ip), port


def parse_v2(header: bytes, body: bytes, peer: Address) -> Address:
    """A v2 header (its 16 bytes and the ``body`` they announce) -> the source address."""
    if header[:12] != V2_SIGNATURE:
        raise ProxyError("not a v2 header")
    version, command = header[12] >> 4, header[12] & 0x0F
    if version != 2 or command not in (0, 1):
        raise ProxyError("v2 header: unknown version or command")
    if command == 0:  # LOCAL: the proxy's own connection (a health check)
        return peer
    family, transport = header[13] >> 4, header[13] & 0x0F
    if transport != 1:  # not STREAM: nothing an SMTP client can be
        raise ProxyError("v2 header: not a stream")
    if family == 1 and len(body) >= 12:
        src = socket.inet_ntop(socket.AF_INET, body[0:4])
        (port,) = struct.unpack("!H", body[8:10])
        return src, port
    if family == 2 and len(body) >= 36:
        src = socket.inet_ntop(socket.AF_INET6, body[0:16])
        (port,) = struct.unpack("!H", body[32:34])
        return src, port
    if family == 0:  # UNSPEC
        return peer
    raise ProxyError("v2 header: unknown address family or a short address block")


async def _take(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes (never more), or ProxyError if the peer closes first."""
    out = b""
    while len(out) < n:
        chunk = await loop.sock_recv(sock, n - len(out))
        if not chunk:
            raise ProxyError("closed inside the header")
        out += chunk
    return out


async def read_header(sock: socket.socket, peer: Address) -> Address:
    """The client's address from the header at the start of ``sock`` (which must come from a
    trusted proxy), reading nothing past it. Raises ProxyError (or TimeoutError)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(HEADER_TIMEOUT):
        first = await _take(loop, sock, 1)
        if first == V2_SIGNATURE[:1]:
            header = first + await _take(loop, sock, 15)
            (length,) = struct.unpack("!H", header[14:16])
            if 16 + length > V2_MAX:
                raise ProxyError("v2 header too long")
            return parse_v2(header, await _take(loop, sock, length), peer)
        if first != b"P":
            raise ProxyError("no PROXY header")
        line = first
        while not line.endswith(b"\r\n"):  # a byte at a time: nothing past the line is read
            if len(line) >= V1_MAX:
                raise ProxyError("v1 header without its CRLF within 107 bytes")
            line += await _take(loop, sock, 1)
        return parse_v1(line, peer)
