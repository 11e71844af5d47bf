"""The PROXY protocol on a listener (issue 15, item 4): the client's address from a trusted
balancer, everywhere; a header from anyone else, or none from a balancer, refused.

The relay runs in-process with both listeners in ``proxy_protocol`` mode trusting 127.0.0.1;
clients are raw sockets that write the header themselves (v1 and v2, IPv4 and IPv6), and a
client on 127.0.0.2 is the untrusted one. The last tests put Debian's HAProxy in front
(``send-proxy`` and ``send-proxy-v2``), a client connecting to it from 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from relay import replies
from relay.clock import ManualClock
from relay.config import Config, Listener
from relay.service import proxyproto
from relay.store import users
from relay.store.users import SettingsChange
from tests import procs
from tests.dialogue import Dialogue
from tests.hostile.kit import LOGIN, eventually, message, queued
from tests.relayserver import RelayHandle, start_relay

CLIENT_V4 = ("192.0.2.7", 40001)
CLIENT_V6 = ("2001:db8::7", 40002)


def v1(client: tuple[str, int], family: str = "TCP4") -> bytes:
    return f"PROXY {family} {client[0]} 127.0.0.1 {client[1]} 25\r\n".encode()


def v2(client: tuple[str, int], *, local: bool = False) -> bytes:
    if local:
        return proxyproto.V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    ip = socket.inet_pton(socket.AF_INET6 if ":" in client[0] else socket.AF_INET, client[0])
    family = 0x21 if len(ip) == 16 else 0x11
    dst = bytes(len(ip))
    block = ip + dst + struct.pack("!HH", client[1], 25) + b"\x03\x00\x04abcd"  # and a TLV
    return proxyproto.V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block


@pytest.fixture
async def proxied(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> AsyncIterator[RelayHandle]:
    trusted = ("127.0.0.1/32",)
    listen = tuple(
        dataclasses.replace(li, proxy_protocol=True, trusted_proxies=trusted)
        for li in relay_cfg.listen
    )
    auth = dataclasses.replace(relay_cfg.auth, max_failures=3)
    cfg = dataclasses.replace(relay_cfg, listen=listen, auth=auth)
    handle = await start_relay(cfg, tls_files[2], clock)
    yield handle
    await handle.server.shutdown()
    handle.close()


async def through_proxy(
    port: int, header: bytes, *, tls: ssl.SSLContext | None = None, source: str = "127.0.0.1"
) -> Dialogue:
    """A connection that begins with ``header`` (as a balancer's would), then SMTP."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    sock.sendall(header)
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=tls, server_hostname="relay.test" if tls else None
    )
    d = Dialogue(reader, writer)
    await d.expect("220")
    return d


def test_headers_parse() -> None:
    peer = ("127.0.0.1", 5555)
    assert proxyproto.parse_v1(v1(CLIENT_V4), peer) == CLIENT_V4
    assert proxyproto.parse_v1(v1(CLIENT_V6, "TCP6"), peer) == CLIENT_V6
    assert proxyproto.parse_v1(b"PROXY UNKNOWN\r\n", peer) == peer
    for bad in (
        b"PROXY TCP4 192.0.2.7 127.0.0.1 1\r\n",  # a field missing
        b"PROXY TCP4 2001:db8::7 127.0.0.1 1 25\r\n",  # family and address disagree
        b"PROXY TCP4 192.0.2.7 127.0.0.1 99999 25\r\n",
        b"PROXY UDP4 192.0.2.7 127.0.0.1 1 25\r\n",
        b"PROXY TCP4 192.0.2.7 127.0.0.1 1 25\n",
        b"PROXY TCP4 " + b"9" * 120 + b"\r\n",
    ):
        with pytest.raises(proxyproto.ProxyError):
            proxyproto.parse_v1(bad, peer)
    for client in (CLIENT_V4, CLIENT_V6):
        header = v2(client)
        assert proxyproto.parse_v2(header[:16], header[16:], peer) == client
    local = v2(CLIENT_V4, local=True)
    assert proxyproto.parse_v2(local[:16], local[16:], peer) == peer
    udp = bytearray(v2(CLIENT_V4))
    udp[13] = 0x12
    with pytest.raises(proxyproto.ProxyError):
        proxyproto.parse_v2(bytes(udp[:16]), bytes(udp[16:]), peer)
    assert proxyproto.trusted("127.0.0.1", ["127.0.0.0/8"])
    assert proxyproto.trusted("::ffff:127.0.0.1", ["127.0.0.1/32"])
    assert not proxyproto.trusted("127.0.0.2", ["127.0.0.1/32"])


@pytest.mark.parametrize(
    ("header", "client"),
    [(v1(CLIENT_V4), CLIENT_V4), (v2(CLIENT_V4), CLIENT_V4), (v2(CLIENT_V6), CLIENT_V6)],
    ids=["v1", "v2", "v2-ipv6"],
)
async def test_the_header_address_is_the_client_everywhere(
    proxied: RelayHandle, caplog: pytest.LogCaptureFixture, header: bytes, client: tuple[str, int]
) -> None:
    """On both listeners (the implicit-TLS one: header, then the handshake on the same bytes):
    the gate counts the client's address, the mail log and Received: name it, and the user's IP
    allow-list is matched against it."""
    caplog.set_level(logging.INFO)
    relay = proxied
    password = await relay.add_user(LOGIN)
    db = relay.server.db
    assert db is not None
    only = SettingsChange(allow_ip=[client[0]])
    await users.update_settings(db, LOGIN, only, now=relay.clock(), actor="test")
    d = await through_proxy(relay.tls_port, header, tls=relay.client_context())
    assert relay.server.gate.per_ip.get(client[0]) == 1, relay.server.gate.per_ip
    await d.login(LOGIN, password)
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
    await d.expect_after("RCPT TO:<bob@dest.test>", "250")
    await d.expect_after("DATA", "354")
    d.send_raw(message() + b".\r\n")
    await d.expect("250 2.0.0 queued as")
    await d.close()
    plain = await through_proxy(relay.starttls_port, header)
    await plain.expect_after("EHLO client.test", "250")
    await plain.close()
    (info,) = await queued(relay)
    spool = relay.server.spool
    assert spool is not None
    msg = await spool.load(info.id)
    assert msg is not None
    assert f"([{client[0]}])".encode() in msg.body.split(b"\r\n\r\n")[0]
    lines = [r.getMessage() for r in caplog.records]
    assert any(x.startswith("auth ok") and f"ip={client[0]}" in x for x in lines), lines
    assert any(x.startswith("queued") and f"ip={client[0]}" in x for x in lines), lines
    assert not any("ip=127.0.0.1" in x for x in lines if x.startswith(("auth", "queued")))


async def test_failures_count_and_lock_out_by_the_header_address(proxied: RelayHandle) -> None:
    """auth.max_failures = 3: three wrong passwords from the proxied 192.0.2.7 lock that client
    out (454), not another client behind the same balancer."""
    relay = proxied
    await relay.add_user(LOGIN)
    blob = "AG5vYm9keUBleGFtcGxlLmNvbQB3cm9uZw=="  # \0nobody@example.com\0wrong

    async def attempt(client: tuple[str, int]) -> str:
        d = await through_proxy(relay.tls_port, v2(client), tls=relay.client_context())
        await d.expect_after("EHLO client.test", "250")
        reply = await d.reply_after(f"AUTH PLAIN {blob}")
        await d.close()
        return reply

    for _ in range(3):
        assert (await attempt(CLIENT_V4)).startswith("535 5.7.8")
    assert (await attempt(CLIENT_V4)).startswith("454 4.7.0")
    assert (await attempt(("192.0.2.8", 40003))).startswith("535 5.7.8")


async def test_a_balancer_without_a_header_is_closed_before_a_greeting(
    proxied: RelayHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    relay = proxied
    for first in (b"EHLO client.test\r\n", b"PROXY TCP4 junk\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.starttls_port)
        writer.write(first)
        await writer.drain()
        try:  # closed, nothing said (a reset: what it sent was not read)
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            pass
        writer.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("proxy refused")]
    assert len(lines) == 2 and all("ip=127.0.0.1" in x for x in lines), lines
    await eventually(lambda: relay.server.gate.per_ip == {}, what="nothing counted")


async def test_a_header_from_an_untrusted_address_is_refused(proxied: RelayHandle) -> None:
    """127.0.0.2 is no balancer: it is a client itself, greeted at once with its own address;
    the PROXY line it sends gets 554 5.7.0 and the connection ends. On the implicit-TLS
    listener the header is no ClientHello: the handshake fails."""
    relay = proxied
    d = await Dialogue.open(relay.starttls_port, source="127.0.0.2")
    assert relay.server.gate.per_ip.get("127.0.0.2") == 1
    assert await d.reply_after(v1(CLIENT_V4).rstrip(b"\r\n")) == str(replies.PROXY_REFUSED)
    assert await d.closed()
    await d.close()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await through_proxy(
            relay.tls_port, v2(CLIENT_V4), tls=relay.client_context(), source="127.0.0.2"
        )
    direct = await Dialogue.open(relay.tls_port, tls=relay.client_context(), source="127.0.0.2")
    await direct.expect_after("EHLO client.test", "250")
    await direct.close()


def test_proxy_protocol_needs_trusted_proxies() -> None:
    with pytest.raises(ValueError, match="trusted_proxies"):
        Listener("127.0.0.1", 0, "starttls", proxy_protocol=True)
    with pytest.raises(ValueError, match="trusted_proxies"):
        Listener("127.0.0.1", 0, "starttls", trusted_proxies=("not-a-network",))


# --- behind a real HAProxy ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def haproxy_config(path: Path, backends: dict[int, tuple[int, str]]) -> Iterator[Path]:
    """A HAProxy config: for each frontend port, TCP mode to (relay port, send-proxy option)."""
    parts = [
        "global\n    maxconn 100\n",
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n",
    ]
    for front, (back, option) in backends.items():
        parts.append(
            f"listen relay{front}\n    bind 127.0.0.1:{front}\n"
            f"    server relaybox 127.0.0.1:{back} {option}\n"
        )
    path.write_text("\n".join(parts))
    yield path


HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
)


@pytest.mark.skipif(HAPROXY is None and not os.environ.get("CI"), reason="haproxy not installed")
async def test_behind_haproxy_send_proxy_v1_and_v2(proxied: RelayHandle, tmp_path: Path) -> None:
    """Debian's HAProxy in front, ``send-proxy-v2`` to the implicit-TLS listener and
    ``send-proxy`` (v1) to the STARTTLS one; a client connecting to HAProxy from 127.0.0.2: the
    relay counts and logs 127.0.0.2, not HAProxy's 127.0.0.1."""
    assert HAPROXY is not None, "CI installs haproxy (scripts/test)"
    relay = proxied
    password = await relay.add_user(LOGIN)
    v2_front, v1_front = free_port(), free_port()
    backends = {
        v2_front: (relay.tls_port, "send-proxy-v2"),
        v1_front: (relay.starttls_port, "send-proxy"),
    }
    with haproxy_config(tmp_path / "haproxy.cfg", backends) as conf:
        proc = await procs.spawn(HAPROXY, "-db", "-f", str(conf), stderr=asyncio.subprocess.PIPE)
        try:
            for port in (v2_front, v1_front):
                for _ in range(200):  # until HAProxy listens (it has no readiness signal)
                    with socket.socket() as probe:
                        if probe.connect_ex(("127.0.0.1", port)) == 0:
                            break
                    await asyncio.sleep(0.02)  # sleep-ok: polling HAProxy's bind, bounded
            tls = await Dialogue.open(v2_front, tls=relay.client_context(), source="127.0.0.2")
            assert relay.server.gate.per_ip.get("127.0.0.2") == 1, relay.server.gate.per_ip
            await tls.login(LOGIN, password)
            await tls.close()
            plain = await Dialogue.open(v1_front, source="127.0.0.2")
            await plain.starttls(relay.client_context())
            await plain.login(LOGIN, password)
            assert relay.server.gate.per_ip.get("127.0.0.2") == 1, relay.server.gate.per_ip
            assert "127.0.0.1" not in relay.server.gate.per_ip
            await plain.close()
        finally:
            procs.kill_group(proc.pid)
            await proc.wait()
