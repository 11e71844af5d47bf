"""relay/metrics.py: the counters, and the /metrics endpoint scraped over real HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from pathlib import Path
from shutil import which

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from relay import __version__
from relay.config import Config
from relay.config_sections import MetricsConfig
from relay.metrics import MAX_REASONS, Metrics, parse_listen
from tests import procs
from tests.dialogue import Dialogue, plain
from tests.relayserver import start_relay


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def test_counters_start_at_zero_and_count() -> None:
    m = Metrics()
    text = m.render().decode()
    assert value(text, "relaybox_auth_total", result="failed") == 0
    assert value(text, "relaybox_recipients_total", outcome="bounced") == 0
    assert value(text, "relaybox_queue_depth", state="deferred") == 0
    assert value(text, "relaybox_domains", state="suspended") == 0
    assert value(text, "relaybox_build_info", version=__version__) == 1

    m.connection_opened("starttls")
    m.connection_opened("starttls")
    m.connection_opened("tls")
    m.connection_closed("starttls")
    for _ in range(3):
        m.auth_failed()
    m.auth_ok()
    m.auth_throttled()
    m.accepted(recipients=2, size=1000)
    m.accepted(recipients=1, size=500)
    m.rejected("sender_not_allowed")
    m.rejected("Sender Not Allowed")  # folded to the same label
    m.delivered(0.3)
    m.delivered(7200)
    m.deferred()
    m.bounced()
    m.set_queue_depth({"queued": 4, "deferred": 2})
    m.set_domain_states({"verified": 2, "failing": 1})

    text = m.render().decode()
    assert value(text, "relaybox_connections_total", listener="starttls") == 2
    assert value(text, "relaybox_connections_total", listener="tls") == 1
    assert value(text, "relaybox_connections_current", listener="starttls") == 1
    assert value(text, "relaybox_auth_total", result="failed") == 3
    assert value(text, "relaybox_auth_total", result="ok") == 1
    assert value(text, "relaybox_auth_total", result="throttled") == 1
    assert value(text, "relaybox_messages_accepted_total") == 2
    assert value(text, "relaybox_recipients_accepted_total") == 3
    assert value(text, "relaybox_accepted_bytes_total") == 1500
    assert value(text, "relaybox_messages_rejected_total", reason="sender_not_allowed") == 2
    assert value(text, "relaybox_recipients_total", outcome="delivered") == 2
    assert value(text, "relaybox_recipients_total", outcome="deferred") == 1
    assert value(text, "relaybox_recipients_total", outcome="bounced") == 1
    assert value(text, "relaybox_delivery_latency_seconds_count") == 2
    assert value(text, "relaybox_delivery_latency_seconds_bucket", le="0.5") == 1
    assert value(text, "relaybox_delivery_latency_seconds_bucket", le="3600.0") == 1
    assert value(text, "relaybox_delivery_latency_seconds_bucket", le="14400.0") == 2
    assert value(text, "relaybox_queue_depth", state="queued") == 4
    assert value(text, "relaybox_domains", state="failing") == 1

    # A snapshot replaces the previous one: states now absent read 0.
    m.set_queue_depth({"queued": 1})
    text = m.render().decode()
    assert value(text, "relaybox_queue_depth", state="queued") == 1
    assert value(text, "relaybox_queue_depth", state="deferred") == 0


def test_two_instances_do_not_share_counters() -> None:
    a, b = Metrics(), Metrics()
    a.auth_ok()
    assert value(a.render().decode(), "relaybox_auth_total", result="ok") == 1
    assert value(b.render().decode(), "relaybox_auth_total", result="ok") == 0


def test_rejection_reasons_are_bounded() -> None:
    m = Metrics()
    for i in range(MAX_REASONS + 20):
        m.rejected(f'reason {i} \n"x"')
    reasons = {
        s.labels["reason"]
        for f in text_string_to_metric_families(m.render().decode())
        if f.name == "relaybox_messages_rejected"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert len(reasons) == MAX_REASONS + 1
    assert "other" in reasons
    assert all(r.replace("_", "").isalnum() for r in reasons)
    assert value(m.render().decode(), "relaybox_messages_rejected_total", reason="other") == 20


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9465") == ("127.0.0.1", 9465)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":9465") == (None, 9465)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen("localhost")


async def http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return lines[0], headers, body


async def test_http_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    server, port = await m.start_http("127.0.0.1:0")
    try:
        assert port > 0
        assert server.sockets[0].getsockname()[0] == "127.0.0.1"
        assert f"http://127.0.0.1:{port}/metrics" in caplog.text
        m.auth_failed()
        m.auth_failed()

        status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.0 200 OK"
        assert headers["content-type"].startswith("text/plain")
        assert int(headers["content-length"]) == len(body)
        assert value(body.decode(), "relaybox_auth_total", result="failed") == 2

        # Prometheus may ask for OpenMetrics; it gets it.
        accept = b"Accept: application/openmetrics-text; version=1.0.0\r\n"
        status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\n" + accept + b"\r\n")
        assert headers["content-type"].startswith("application/openmetrics-text")
        assert body.rstrip().endswith(b"# EOF")

        status, headers, body = await http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert status == "HTTP/1.0 200 OK" and body == b""
        status, _, _ = await http(port, b"GET /nope HTTP/1.0\r\n\r\n")
        assert status == "HTTP/1.0 404 Not Found"
        status, _, _ = await http(port, b"POST /metrics HTTP/1.0\r\n\r\n")
        assert status == "HTTP/1.0 405 Method Not Allowed"
        status, _, _ = await http(port, b"garbage\r\n\r\n")
        assert status == "HTTP/1.0 400 Bad Request"
        # An oversized request line is dropped, and the endpoint keeps serving.
        _, _, body = await http(port, b"GET /" + b"a" * 20000 + b" HTTP/1.0\r\n\r\n")
        assert body == b""
        status, _, _ = await http(port, b"GET / HTTP/1.0\r\n\r\n")
        assert status == "HTTP/1.0 200 OK"
    finally:
        await m.stop_http()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.skipif(which("curl") is None, reason="curl not installed")
async def test_curl_scrapes_it() -> None:
    m = Metrics()
    m.delivered(1.0)
    _, port = await m.start_http("127.0.0.1:0")
    try:
        proc = await procs.spawn(
            "curl", "-sS", "--fail", f"http://127.0.0.1:{port}/metrics",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert value(out.decode(), "relaybox_recipients_total", outcome="delivered") == 1
    finally:
        await m.stop_http()


# --- scraped from the real server after real traffic --------------------------------------------

LOGIN = "app@example.com"


async def test_scrape_after_real_traffic(cfg: Config, tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("relay.test", "127.0.0.1")
    issued.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    relay_cfg = dataclasses.replace(
        cfg,
        tls=dataclasses.replace(
            cfg.tls, cert=str(tmp_path / "cert.pem"), key=str(tmp_path / "key.pem")
        ),
        delivery=dataclasses.replace(cfg.delivery, paused=True),
        metrics=MetricsConfig(listen="127.0.0.1:0"),
    )
    relay = await start_relay(relay_cfg, tmp_path / "ca.pem")
    try:
        password = await relay.add_user(LOGIN)
        port = relay.server.metrics.http_port
        assert port is not None
        ctx = relay.client_context()

        d = await Dialogue.open(relay.tls_port, tls=ctx)
        await d.expect_after("EHLO client.test", "250")
        for _ in range(2):
            await d.expect_after("AUTH PLAIN " + plain(LOGIN, "wrong-password-1"), "535")
        await d.expect_after("AUTH PLAIN " + plain(LOGIN, password), "235")
        await d.expect_after("MAIL FROM:<someone@elsewhere.test>", "550")
        for rcpts in (["a@dest.test", "b@dest.test"], ["c@dest.test"]):
            await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
            for rcpt in rcpts:
                await d.expect_after(f"RCPT TO:<{rcpt}>", "250")
            await d.expect_after("DATA", "354")
            body = f"From: {LOGIN}\r\nTo: {rcpts[0]}\r\nSubject: m\r\n\r\nhello\r\n."
            await d.expect_after(body, "250")
        await d.expect_after("QUIT", "221")
        await d.close()
        d = await Dialogue.open(relay.starttls_port)
        await d.expect_after("QUIT", "221")
        await d.close()

        status, _, body = await http(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert status == "HTTP/1.0 200 OK"
        text = body.decode()
        assert value(text, "relaybox_connections_total", listener="tls") == 1
        assert value(text, "relaybox_connections_total", listener="starttls") == 1
        assert value(text, "relaybox_auth_total", result="failed") == 2
        assert value(text, "relaybox_auth_total", result="ok") == 1
        assert value(text, "relaybox_auth_total", result="throttled") == 0
        assert value(text, "relaybox_messages_accepted_total") == 2
        assert value(text, "relaybox_recipients_accepted_total") == 3
        assert value(text, "relaybox_accepted_bytes_total") > 0
        rejected = {
            k[1]: v for k, v in samples(text).items() if k[0] == "relaybox_messages_rejected_total"
        }
        assert sum(rejected.values()) == 1, rejected
    finally:
        await relay.server.shutdown()
        relay.close()
    assert relay.server.metrics.http_port is None
