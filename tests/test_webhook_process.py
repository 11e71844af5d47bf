"""`relaybox serve` posts webhooks from a child process per worker (relay/service/posterproc.py).

The server runs as a real subprocess with one endpoint, a loopback receiver in this process, and
its metrics endpoint on a free port. What is shown: the poster is a separate process (so the
SMTP loop spends no time on HTTP) whose posts are signed as in-process ones are; its counts reach
the worker's /metrics; killed, it is started again and the events it had not posted still
arrive; SIGHUP hands it a new config and the endpoints read again; a stopping worker stops it
(no process left behind), and an orphaned one stops once its worker is gone. Without an endpoint
there is no poster process at all (one starts once an endpoint is added and read).
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import time
import urllib.request
from pathlib import Path

from click.testing import CliRunner
from standardwebhooks.webhooks import Webhook

from admin.cli import cli
from relay import config as config_mod
from tests import leaks
from tests.dialogue import Dialogue
from tests.faults.procserver import ServerProcess
from tests.hostile.kit import LOGIN, clean, message
from tests.pgcluster import free_port
from tests.serverconf import smarthost, write_serve_config
from tests.sink import Sink
from tests.userhelpers import json_of, seed_user
from tests.webhookreceiver import Receiver, running

WITHIN = 20.0


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux: /proc/PID/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "children").read_text()
        except FileNotFoundError:  # a thread that ended after the listing (a pool's worker)
            continue
        found += [int(c) for c in text.split()]
    return found


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return []
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def poster_of(server: ServerProcess, not_pid: int = 0) -> int:
    """The pid of the server's webhook poster process (waiting for one other than ``not_pid``)."""
    assert server.proc is not None
    async with asyncio.timeout(WITHIN):
        while True:
            for child in children(server.proc.pid):
                if child != not_pid and "webhook-poster" in cmdline(child):
                    return child
            await asyncio.sleep(0.05)  # sleep-ok: polling /proc for a process to appear


async def gone(pid: int) -> None:
    async with asyncio.timeout(WITHIN):
        while True:  # no event to wait on: another process's end, seen in /proc
            if not alive(pid):
                return
            await asyncio.sleep(0.05)  # sleep-ok: polling /proc for a process to end


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310 (loopback)
        return resp.read().decode()


async def metric_reaches(port: int, line: str) -> None:
    async with asyncio.timeout(WITHIN):
        while True:  # another process's counter, seen by scraping it
            if line in await asyncio.to_thread(scrape, port):
                return
            await asyncio.sleep(0.1)  # sleep-ok: the counts come in every 0.1 s


async def cli_add_endpoint(config: Path, url: str, *events: str) -> str:
    """``relaybox webhook add`` through the CLI, as an operator would: the secret it printed."""
    args = ["--config", str(config), "webhook", "add", url, "--json"]
    if events:
        args += ["--events", ",".join(events)]
    made = json_of(await asyncio.to_thread(CliRunner().invoke, cli, args))
    return leaks.add(str(made["secret"]))


async def send_one(port: int, ctx: ssl.SSLContext, password: str, rcpt: str) -> str:
    d = await Dialogue.open(port, tls=ctx)
    await d.login(LOGIN, password)
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
    await d.expect_after(f"RCPT TO:<{rcpt}>", "250")
    await d.expect_after("DATA", "354")
    d.send_raw(message(to=rcpt) + b".\r\n")
    reply = await d.expect("250 2.0.0 queued as ")
    await d.close()
    return reply.split()[-1]


async def accepted(receiver: Receiver, queue_id: str) -> dict[str, object]:
    got = await receiver.wait_for(
        lambda reqs: any(r.status == 200 and queue_id in r.body.decode() for r in reqs)
    )
    [req] = [r for r in got if r.status == 200 and queue_id in r.body.decode()][:1]
    return {"headers": req.headers, "body": req.body}


async def test_serve_posts_from_a_child_process_restarted_if_it_dies(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    metrics_port = free_port()
    path = write_serve_config(
        tmp_path, tls_files, dns={"dkim_key_type": "ed25519"}, delivery=smarthost(sink.port),
        metrics=f"127.0.0.1:{metrics_port}", webhooks={"backoff": "200ms"},
    )  # fmt: skip
    cfg = config_mod.load(path)
    password = await seed_user(cfg, LOGIN, now=time.time())
    ctx = ssl.create_default_context(cafile=str(tls_files[2]))
    async with running() as receiver:
        secret = await cli_add_endpoint(path, receiver.url, "message.accepted")
        server = ServerProcess(path, listeners=1)
        try:
            await server.start()
            assert server.proc is not None
            first = await poster_of(server)
            assert cmdline(first)[-3:] == ["webhook-poster", "--log-level", "INFO"]

            queue_id = await send_one(server.ports["tls"], ctx, password, "one@dest.test")
            req = await accepted(receiver, queue_id)
            event = Webhook(secret).verify(req["body"], req["headers"])  # type: ignore[arg-type]
            assert event["type"] == "message.accepted"
            assert event["data"]["queue_id"] == queue_id
            await metric_reaches(
                metrics_port,
                'relaybox_webhook_events_total{outcome="delivered",type="message.accepted"} 1.0',
            )

            # Killed: the worker starts another; what was pending is posted by the new one.
            receiver.default = 503
            queue_id = await send_one(server.ports["tls"], ctx, password, "two@dest.test")
            await receiver.wait_for(
                lambda reqs: any(queue_id in r.body.decode() for r in reqs if r.status == 503)
            )
            os.kill(first, signal.SIGKILL)
            await server.wait_for_line("webhook poster exited")
            second = await poster_of(server, not_pid=first)
            receiver.default = 200
            req = await accepted(receiver, queue_id)
            Webhook(secret).verify(req["body"], req["headers"])  # type: ignore[arg-type]

            # SIGHUP: the new config and the endpoints go to the same poster process.
            server.signal(signal.SIGHUP)
            await server.wait_for_line("reloaded")
            queue_id = await send_one(server.ports["tls"], ctx, password, "three@dest.test")
            await accepted(receiver, queue_id)
            assert alive(second)

            server.signal(signal.SIGTERM)
            assert await server.wait() == 0
            assert not alive(second)  # stopped with its worker, not left behind
        finally:
            await server.ensure_stopped()
    for line in server.lines:
        clean(line, "server log")
        assert secret not in line
    assert not any("Traceback" in line for line in server.lines)


async def test_a_poster_whose_worker_is_killed_stops_by_itself(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    path = write_serve_config(tmp_path, tls_files, delivery=smarthost(sink.port))
    async with running() as receiver:
        await cli_add_endpoint(path, receiver.url)
        server = ServerProcess(path, listeners=1)
        try:
            await server.start()
            child = await poster_of(server)
            server.signal(signal.SIGKILL)  # the worker only: the pipe's end is its only signal
            assert await server.wait() == -signal.SIGKILL  # stderr closed: the child ended too
            await gone(child)
        finally:
            await server.ensure_stopped()


async def test_no_poster_process_until_there_is_an_endpoint(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    path = write_serve_config(
        tmp_path, tls_files, dns={"dkim_key_type": "ed25519"}, delivery=smarthost(sink.port)
    )
    cfg = config_mod.load(path)
    password = await seed_user(cfg, LOGIN, now=time.time())
    ctx = ssl.create_default_context(cafile=str(tls_files[2]))
    async with running() as receiver:
        server = ServerProcess(path, listeners=1)
        try:
            await server.start()
            assert server.proc is not None
            await send_one(server.ports["tls"], ctx, password, "one@dest.test")
            await sink.wait_received(1)  # the whole service ran, posting nothing
            assert not [c for c in children(server.proc.pid) if "webhook-poster" in cmdline(c)]
            assert not [line for line in server.lines if "webhook poster started" in line]

            secret = await cli_add_endpoint(path, receiver.url)
            server.signal(signal.SIGHUP)  # the endpoints are read again: now there is one
            await server.wait_for_line("webhook poster started")
            await poster_of(server)
            queue_id = await send_one(server.ports["tls"], ctx, password, "two@dest.test")
            req = await accepted(receiver, queue_id)
            Webhook(secret).verify(req["body"], req["headers"])  # type: ignore[arg-type]
            server.signal(signal.SIGTERM)
            assert await server.wait() == 0
        finally:
            await server.ensure_stopped()
