"""Three nodes on one PostgreSQL store behind HAProxy (issue 15's must-show).

Real things only: a PostgreSQL cluster on loopback (tests/pgserver.py), Debian's HAProxy with
``send-proxy-v2`` and SMTP health checks, three ``relaybox serve`` processes (each its own state
dir and spool, one shared store), the admin CLI of one node or another, clients connecting to
HAProxy from 127.0.0.2 and 127.0.0.3, and a sink as the smarthost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from admin.cli import cli
from relay import config as config_mod
from relay.store import shared
from tests import leaks, procs
from tests.dialogue import Dialogue, plain
from tests.faults.procserver import ServerProcess
from tests.hostile.kit import message
from tests.pgserver import PgServer, free_port
from tests.serverconf import serve_config, smarthost, toml
from tests.sink import Sink
from tests.userhelpers import make_domain

LOGIN = "app@example.com"
FIRST = "Multi-node-password-0001"
SECOND = "Multi-node-password-0002"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
NODES = 3
# CI installs it (scripts/test): there a missing HAProxy fails the test instead.
NEEDS_HAPROXY = pytest.mark.skipif(
    not os.path.exists(HAPROXY) and not os.environ.get("CI"), reason="no haproxy"
)


@dataclass
class Node:
    name: str
    config: Path
    server: ServerProcess
    front: int  # HAProxy's frontend for this node alone

    @property
    def port(self) -> int:
        return self.server.ports["starttls"]

    async def cli(self, *args: str, input: str | None = None) -> Result:
        """The node's `relaybox --config ... ARGS` (its own event loop, so in a thread)."""
        argv = ["--config", str(self.config), *args]
        return await asyncio.to_thread(CliRunner().invoke, cli, argv, input=input)


@dataclass
class Cluster:
    nodes: list[Node]
    balanced: int  # HAProxy's round-robin frontend over every node
    ca: Path
    haproxy: asyncio.subprocess.Process | None = None
    haproxy_cfg: Path | None = None
    fronts: dict[str, int] = field(default_factory=dict)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    async def session(self, port: int, source: str = "127.0.0.2") -> Dialogue:
        d = await Dialogue.open(port, source=source)
        await d.expect_after("EHLO client.test", "250")
        await d.starttls(self.context())
        return d

    async def auth(self, port: int, password: str, source: str = "127.0.0.2") -> str:
        """The reply to AUTH PLAIN through ``port`` from ``source``."""
        d = await self.session(port, source)
        try:
            await d.expect_after("EHLO client.test", "250")
            return await d.reply_after(f"AUTH PLAIN {plain(LOGIN, password)}")
        finally:
            await d.close()


def node_config(
    directory: Path,
    tls_files: tuple[Path, Path, Path],
    sink: Sink,
    store: dict[str, Any],
    *,
    paused: bool = False,
) -> Path:
    cert, key, _ca = tls_files
    text = serve_config(
        state=directory / "state",
        cert=cert,
        key=key,
        listen=(),
        auth={"max_failures": 5, "cache_ttl": "5m"},
        limits={"drain_timeout": "5s"},
        delivery=smarthost(sink.port, paused=paused),
    )
    listener = {
        "address": "127.0.0.1",
        "port": 0,
        "mode": "starttls",
        "proxy_protocol": True,
        "trusted_proxies": ["127.0.0.1/32"],
    }
    text += "\n[[listen]]\n" + toml(listener) + "\n" + toml(store, "store")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "relaybox.toml"
    path.write_text(text)
    return path


def haproxy_text(fronts: dict[int, list[int]]) -> str:
    """Each frontend port to its backends, ``send-proxy-v2``, health-checked with EHLO (through a
    PROXY header too, as relaybox requires of every connection from a balancer)."""
    parts = [
        "global\n    maxconn 200\n",
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n"
        "    timeout server 30s\n",
    ]
    for front, backs in fronts.items():
        servers = "".join(
            f"    server node{i} 127.0.0.1:{port} send-proxy-v2 check check-send-proxy"
            " inter 500ms fall 1 rise 1\n"
            for i, port in enumerate(backs)
        )
        parts.append(
            f"listen front{front}\n    bind 127.0.0.1:{front}\n    balance roundrobin\n"
            f"    option smtpchk EHLO haproxy.test\n{servers}"
        )
    return "\n".join(parts)


async def _listening(port: int) -> None:
    for _ in range(250):  # until HAProxy listens (it has no readiness signal), bounded
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        await asyncio.sleep(0.02)  # sleep-ok: polling HAProxy's bind
    raise AssertionError(f"HAProxy did not listen on {port}")


async def start_haproxy(cluster: Cluster, directory: Path) -> None:
    fronts = {n.front: [n.port] for n in cluster.nodes}
    fronts[cluster.balanced] = [n.port for n in cluster.nodes]
    cluster.haproxy_cfg = directory / "haproxy.cfg"
    cluster.haproxy_cfg.write_text(haproxy_text(fronts))
    cluster.haproxy = await procs.spawn(
        HAPROXY, "-db", "-f", str(cluster.haproxy_cfg), stderr=asyncio.subprocess.DEVNULL
    )
    for front in fronts:
        await _listening(front)


@contextlib.asynccontextmanager
async def running_cluster(
    tmp_path: Path,
    tls_files: tuple[Path, Path, Path],
    sink: Sink,
    pg_server: PgServer,
    paused: tuple[int, ...] = (),
) -> AsyncIterator[Cluster]:
    """``paused``: the nodes (1-based) whose delivery is paused at start."""
    dbname = pg_server.new_database()
    store = {
        "url": pg_server.url(dbname),
        "password_file": str(pg_server.password_file),
        "sslmode": "disable",
    }
    nodes: list[Node] = []
    try:
        for i in range(1, NODES + 1):
            path = node_config(tmp_path / f"node{i}", tls_files, sink, store, paused=i in paused)
            nodes.append(Node(f"node{i}", path, ServerProcess(path, listeners=1), free_port()))
        await nodes[0].server.start()  # the first migrates the empty store
        await asyncio.gather(*(n.server.start() for n in nodes[1:]))
        cluster = Cluster(nodes, free_port(), tls_files[2])
        await start_haproxy(cluster, tmp_path)
        try:
            yield cluster
        finally:
            if cluster.haproxy is not None:
                procs.kill_group(cluster.haproxy.pid)
                await cluster.haproxy.wait()
    finally:
        for n in nodes:
            await n.server.ensure_stopped()


async def _verified_domain(node: Node) -> None:
    cfg = config_mod.load(node.config)
    db = await shared.open_main(cfg)
    try:
        await make_domain(db, cfg, now=time.time())
    finally:
        await db.close()


async def _first_user(node: Node) -> None:
    """A verified domain, and LOGIN added (password FIRST) with ``node``'s CLI."""
    await _verified_domain(node)
    added = await node.cli("user", "add", LOGIN, "--password-stdin", input=FIRST + "\n")
    assert added.exit_code == 0, added.output


async def _send(cluster: Cluster, port: int, password: str, n: int, tag: str) -> list[str]:
    """``n`` messages over one session through ``port``; the subjects acknowledged with 250."""
    acked: list[str] = []
    try:
        d = await cluster.session(port)
        await d.expect_after("EHLO client.test", "250")
        await d.expect_after(f"AUTH PLAIN {plain(LOGIN, password)}", "235")
        for i in range(n):
            subject = f"{tag}-{i}"
            await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
            await d.expect_after("RCPT TO:<bob@dest.test>", "250")
            await d.expect_after("DATA", "354")
            d.send_raw(message(subject=subject) + b".\r\n")
            reply = await d.reply()
            if reply.startswith("250"):
                acked.append(subject)
        await d.close()
    except (ConnectionError, AssertionError, ssl.SSLError, asyncio.IncompleteReadError):
        pass  # the node went away mid-session: what it acknowledged before counts
    return acked


@pytest.fixture
def cluster_secrets() -> Iterator[None]:
    for secret in (FIRST, SECOND):
        leaks.add(secret)
        leaks.add_auth_payload(LOGIN, secret)
    yield


@pytest.mark.slow
@NEEDS_HAPROXY
async def test_three_nodes_behind_haproxy_keep_every_promise(
    tmp_path: Path,
    tls_files: tuple[Path, Path, Path],
    sink: Sink,
    pg_server: PgServer,
    cluster_secrets: None,
) -> None:
    async with running_cluster(tmp_path, tls_files, sink, pg_server) as cluster:
        one, two, three = cluster.nodes
        # A user added with the CLI of node 1 logs in through node 3.
        await _first_user(one)
        assert (await cluster.auth(three.front, FIRST)).startswith("235")

        # A reset on node 2: both passwords work everywhere within the grace, the old one
        # nowhere after revoke-old.
        reset = await two.cli(
            "user", "reset-password", LOGIN, "--password-stdin", input=SECOND + "\n"
        )
        assert reset.exit_code == 0, reset.output
        for node in cluster.nodes:
            assert (await cluster.auth(node.front, FIRST)).startswith("235"), node.name
            assert (await cluster.auth(node.front, SECOND)).startswith("235"), node.name
        assert (await three.cli("user", "revoke-old", LOGIN)).exit_code == 0
        for node in cluster.nodes:
            assert (await cluster.auth(node.front, FIRST)).startswith("535 5.7.8"), node.name
            assert (await cluster.auth(node.front, SECOND)).startswith("235"), node.name

        # The mail log and Received: name the client (127.0.0.2), not HAProxy (127.0.0.1).
        assert await _send(cluster, two.front, SECOND, 1, "logged") == ["logged-0"]
        got = await sink.wait_received(1)
        head = got[0].data.split(b"\r\n\r\n")[0]
        assert b"([127.0.0.2])" in head and b"([127.0.0.1])" not in head
        queued = [x for x in two.server.lines if "queued" in x and "ip=" in x]
        assert queued and all("ip=127.0.0.2" in x for x in queued), queued

        # Five wrong passwords spread over the three nodes lock 127.0.0.3 out on all of them.
        for i in range(5):
            node = cluster.nodes[i % NODES]
            reply = await cluster.auth(node.front, f"wrong-{i}-password", source="127.0.0.3")
            assert reply.startswith("535"), (i, reply)
        for node in cluster.nodes:  # the right password now gets the lockout's 454
            reply = await cluster.auth(node.front, SECOND, source="127.0.0.3")
            assert reply.startswith("454 4.7.0"), (node.name, reply)
        assert (await cluster.auth(one.front, SECOND)).startswith("235")  # 127.0.0.2 is not

        # A session logged in on node 2; `user delete` on node 1: its next MAIL is refused.
        d = await cluster.session(two.front)
        await d.expect_after("EHLO client.test", "250")
        await d.expect_after(f"AUTH PLAIN {plain(LOGIN, SECOND)}", "235")
        await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
        await d.expect_after("RSET", "250")
        assert (await one.cli("user", "delete", LOGIN, "--yes")).exit_code == 0
        await d.expect_after(f"MAIL FROM:<{LOGIN}>", "535 5.7.8")
        await d.close()


@pytest.mark.slow
@NEEDS_HAPROXY
async def test_a_node_killed_under_load_delivers_what_it_acknowledged_after_a_restart(
    tmp_path: Path,
    tls_files: tuple[Path, Path, Path],
    sink: Sink,
    pg_server: PgServer,
    cluster_secrets: None,
) -> None:
    # Node 2 starts with delivery paused: all it acknowledges is in its spool when it is killed.
    async with running_cluster(tmp_path, tls_files, sink, pg_server, paused=(2,)) as cluster:
        one, two, _three = cluster.nodes
        await _first_user(one)
        load = [
            asyncio.ensure_future(_send(cluster, cluster.balanced, FIRST, 10, f"load{i}"))
            for i in range(6)
        ]
        await two.server.wait_for_line("queued", within=30)
        two.server.signal(signal.SIGKILL)
        acked = [s for batch in await asyncio.gather(*load) for s in batch]
        assert acked, "nothing was acknowledged"
        await two.server.wait()
        text = two.config.read_text().replace("paused = true", "paused = false")
        two.config.write_text(text)
        await two.server.start()  # its spool is delivered once it is back
        want = set(acked)
        await sink.wait_for(lambda s: want <= {_subject(m.data) for m in s.received}, within=60)
        assert want <= {_subject(m.data) for m in sink.received}


def _subject(data: bytes) -> str:
    for line in data.split(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"subject:"):
            return line.split(b":", 1)[1].strip().decode()
    return ""


REFERENCE = Path(__file__).resolve().parent.parent / "conf" / "multinode"


def test_the_reference_node_config_loads() -> None:
    cfg = config_mod.load(REFERENCE / "relaybox-node.toml")
    assert cfg.store.engine == "postgresql" and cfg.store.sslmode == "verify-full"
    assert all(li.proxy_protocol and li.trusted_proxies for li in cfg.listen)


@NEEDS_HAPROXY
def test_the_reference_haproxy_config_is_valid_for_haproxy() -> None:
    done = subprocess.run(
        [HAPROXY, "-c", "-f", str(REFERENCE / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "send-proxy-v2" in (REFERENCE / "haproxy.cfg").read_text()
