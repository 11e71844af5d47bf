"""`relaybox doctor` against a real relay, a real loopback DNS server and real certificate files."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import pwd
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from admin.cli import cli
from relay import config as config_mod
from relay.config import Config
from relay.service.access import readable_by, stray_files
from relay.service.doctor import certificate_on_disk, name_matches
from relay.store import domains, shared
from tests import leaks
from tests.dnsserver import TestDNSServer
from tests.relayserver import RelayHandle, start_relay
from tests.serverconf import serve_config
from tests.userhelpers import make_domain

LOGIN = "app@example.com"


def doctor_config(
    *,
    state: Path,
    hostname: str,
    cert: Path,
    key: Path,
    dns_port: int,
    starttls: int,
    tls: int,
    metrics: int,
) -> str:
    """What doctor reads: both listeners, the loopback DNS server, the metrics endpoint."""
    return serve_config(
        state=state,
        cert=cert,
        key=key,
        hostname=hostname,
        listen=[(starttls, "starttls"), (tls, "tls")],
        dns={
            "nameservers": ["127.0.0.1"],
            "port": dns_port,
            "timeout": "500ms",
            "outbound_ips": ["192.0.2.10"],
        },
        delivery={"paused": True},
        metrics=f"127.0.0.1:{metrics}",
    )


class Box:
    """A config file on disk (what doctor reads) and the certificate files it names."""

    def __init__(self, tmp_path: Path, ca: trustme.CA, dns_port: int) -> None:
        self.dir = tmp_path
        self.ca = ca
        self.dns_port = dns_port
        self.path = tmp_path / "relaybox.toml"
        self.state = tmp_path / "state"
        self.state.mkdir(mode=0o700)
        self.issue()

    def issue(self, *names: str, not_after: datetime.datetime | None = None) -> None:
        cert = self.ca.issue_cert(*(names or ("relay.test", "127.0.0.1")), not_after=not_after)
        cert.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))

    def write(self, *, starttls: int = 0, tls: int = 0, metrics: int = 0, **kw: str) -> Config:
        values: dict[str, Any] = {
            "state": self.state, "hostname": "relay.test", "cert": self.dir / "cert.pem",
            "key": self.dir / "key.pem", "dns_port": self.dns_port, "starttls": starttls,
            "tls": tls, "metrics": metrics,
        }  # fmt: skip
        values.update(kw)
        self.path.write_text(doctor_config(**values))
        return config_mod.load(self.path)


@pytest.fixture
def box(tmp_path: Path, dns_server: TestDNSServer) -> Box:
    return Box(tmp_path, trustme.CA(), dns_server.port)


@pytest.fixture
async def running(box: Box, dns_server: TestDNSServer) -> AsyncIterator[RelayHandle]:
    """The relay started from the box's config; the file then names its real ports."""
    cfg = box.write()
    ca_path = box.dir / "ca.pem"
    box.ca.cert_pem.write_to_path(str(ca_path))
    relay = await start_relay(cfg, ca_path)
    await relay.add_domain("example.com", verified=True)
    d = await domains.get(relay.server.db, "example.com")  # type: ignore[arg-type]
    assert d is not None
    dns_server.publish(domains.records(d, cfg))
    metrics_port = relay.server.metrics.http_port
    assert metrics_port is not None
    box.write(starttls=relay.starttls_port, tls=relay.tls_port, metrics=metrics_port)
    try:
        yield relay
    finally:
        await relay.server.shutdown()
        relay.close()


async def doctor(box: Box, *args: str, env: dict[str, str] | None = None) -> Result:
    """The CLI in a thread: its asyncio.run must not share the relay's loop."""
    runner = CliRunner()
    argv = ["--config", str(box.path), "doctor", "--json", *args]
    return await asyncio.to_thread(runner.invoke, cli, argv, env=env)


def statuses(result: Result) -> dict[str, tuple[str, str]]:
    data = json.loads(result.stdout)
    assert data["ok"] == (result.exit_code == 0)
    return {c["check"]: (c["status"], c["detail"]) for c in data["checks"]}


async def test_a_healthy_box_passes(box: Box, running: RelayHandle) -> None:
    result = await doctor(box)
    checks = statuses(result)
    assert result.exit_code == 0, checks
    for name in ("config", "tls expiry", "tls names", "state dir", "domain example.com",
                 "metrics", f"listen 127.0.0.1:{running.tls_port} tls",
                 f"listen 127.0.0.1:{running.starttls_port} starttls"):  # fmt: skip
        assert checks[name][0] == "pass", (name, checks[name])
    assert checks["users"][0] == "warn"  # none yet
    # Which lock the dependencies came from (scripts/test records requirements-test.txt).
    assert checks["install"][1].startswith(("requirements-test.txt sha256:", "not installed from"))
    assert "ownership pass spf pass dkim pass" in checks["domain example.com"][1]

    # The people's view: a table and a summary line.
    text = await asyncio.to_thread(CliRunner().invoke, cli, ["--config", str(box.path), "doctor"])
    assert text.exit_code == 0
    assert "STATUS" in text.stdout.splitlines()[0]
    assert " 0 fail" in text.stdout


async def test_problems_are_failures(box: Box, dns_server: TestDNSServer) -> None:
    # A certificate that expired yesterday, for another name; nothing listening; DNS records
    # missing for a domain verified earlier; a world-readable state dir.
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    box.issue("other.test", not_after=past)
    with socket.socket() as a, socket.socket() as b:
        # Bound but not listening: connecting is refused while the ports stay ours.
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        cfg = box.write(starttls=a.getsockname()[1], tls=b.getsockname()[1])
        db = await shared.open_main(cfg)
        try:
            await make_domain(db, cfg, "example.com", now=time.time())  # verified earlier
        finally:
            await db.close()
        box.state.chmod(0o755)
        result = await doctor(box)
    checks = statuses(result)
    assert result.exit_code == 1
    assert checks["tls expiry"][0] == "fail" and "expired" in checks["tls expiry"][1]
    assert checks["tls names"] == ("fail", "relay.test not in (other.test)")
    assert checks["state dir"][0] == "warn" and "0700" in checks["state dir"][1]
    listen = f"listen 127.0.0.1:{cfg.listen[1].port} tls"
    assert checks[listen][0] == "fail" and "is the service running" in checks[listen][1]
    domain = checks["domain example.com"]
    assert domain[0] == "fail" and "ownership fail" in domain[1], domain
    # Looking is not verifying: the domain's recorded state did not change.
    result = await asyncio.to_thread(
        CliRunner().invoke, cli, ["--config", str(box.path), "domain", "show", "example.com"]
    )
    assert "verified" in result.stdout


async def test_stale_certificate_after_renewal(box: Box, running: RelayHandle) -> None:
    box.issue()  # renewed on disk, but the service was not reloaded
    checks = statuses(await doctor(box))
    status, detail = checks[f"listen 127.0.0.1:{running.tls_port} tls"]
    assert status == "warn" and "systemctl reload relaybox" in detail
    running.server.cfg = config_mod.load(box.path)
    await running.server.reload(notify=False, cfg=running.server.cfg)
    checks = statuses(await doctor(box))
    assert checks[f"listen 127.0.0.1:{running.tls_port} tls"][0] == "pass"


async def test_send_test(box: Box, running: RelayHandle) -> None:
    password = await running.add_user(LOGIN)
    args = ["--send-test", "someone@dest.test", "--user", LOGIN]
    result = await doctor(box, *args, env={"RELAYBOX_TEST_PASSWORD": password})
    checks = statuses(result)
    assert result.exit_code == 0, checks
    status, detail = checks["send test"]
    assert status == "pass" and "queued as" in detail, detail
    assert password not in result.output

    result = await doctor(box, *args, env={"RELAYBOX_TEST_PASSWORD": password + "-wrong"})
    assert result.exit_code == 1
    status, detail = statuses(result)["send test"]
    assert status == "fail" and "535" in detail

    result = await doctor(box, "--send-test", "someone@dest.test")
    assert result.exit_code == 2 and "--user" in result.output


def _first_der(box: Box) -> bytes:
    pem = (box.dir / "cert.pem").read_bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _issue_unpadded(box: Box) -> bytes:
    """A new certificate whose base64 has no padding (its DER a multiple of 3 bytes long):
    followed by the chain, ssl.PEM_cert_to_DER_cert reads on into the next certificate."""
    for _ in range(64):
        box.issue()
        der = _first_der(box)
        if len(der) % 3 == 0:
            return der
    raise AssertionError("64 certificates, none a multiple of 3 bytes long")


def _append_chain(box: Box) -> None:
    cert = box.dir / "cert.pem"
    cert.write_bytes(cert.read_bytes() + box.ca.cert_pem.bytes())


def test_the_certificate_on_disk_is_the_first_of_a_full_chain(box: Box) -> None:
    first = _issue_unpadded(box)
    _append_chain(box)
    assert certificate_on_disk(box.write()) == first


async def test_a_full_chain_file_is_compared_by_its_first_certificate(
    box: Box, running: RelayHandle
) -> None:
    """Let's Encrypt's fullchain.pem holds the certificate and then its chain: the listener
    serves the first, and doctor compares what it serves with that one only (the same: pass;
    renewed on disk but not reloaded: the warning)."""
    listeners = [f"listen 127.0.0.1:{running.tls_port} tls"]
    listeners.append(f"listen 127.0.0.1:{running.starttls_port} starttls")
    _append_chain(box)
    checks = statuses(await doctor(box))
    assert [checks[name][0] for name in listeners] == ["pass", "pass"], checks
    _issue_unpadded(box)  # renewed, not reloaded
    _append_chain(box)
    checks = statuses(await doctor(box))
    for name in listeners:
        status, detail = checks[name]
        assert status == "warn" and "systemctl reload relaybox" in detail, (name, detail)


@pytest.mark.parametrize("missing", ["key.pem", "cert.pem"])
async def test_a_missing_certificate_or_key_is_named(box: Box, missing: str) -> None:
    box.write()
    (box.dir / missing).unlink()
    status, detail = statuses(await doctor(box))["tls"]
    other = "cert.pem" if missing == "key.pem" else "key.pem"
    assert status == "fail" and str(box.dir / missing) in detail, detail
    assert other not in detail, detail


SECRET_CONFIG = '\n[delivery.smarthost]\nhost = "smtp.upstream.test"\nusername = "relay"\n'


async def test_a_config_holding_a_password_must_not_be_readable_by_others(box: Box) -> None:
    """Readable by everyone, or by a group other than the service's: a warning naming the file
    and its mode. 0600, or 0640 with the service's group (the documented root:relaybox): pass.
    Without a password in it, the check is not made."""
    box.write()
    plain = box.path.read_text()
    box.path.write_text(plain + SECRET_CONFIG + 'password = "Upstream-secret-42"\n')
    leaks.add("Upstream-secret-42")
    for mode, gid, expected in [(0o644, 0, "warn"), (0o600, 0, "pass"), (0o640, None, "pass")]:
        box.path.chmod(mode)
        if gid is not None and os.geteuid() == 0:
            os.chown(box.path, -1, gid)
        status, detail = statuses(await doctor(box))["config secret"]
        assert status == expected, (oct(mode), detail)
        assert str(box.path) in detail and f"{mode:04o}" in detail, detail
    if os.geteuid() == 0:  # another group: only root can give the file to it
        os.chown(box.path, -1, 65534)
        status, detail = statuses(await doctor(box))["config secret"]
        assert status == "warn" and "group" in detail, detail
    box.path.write_text(plain + SECRET_CONFIG)
    box.path.chmod(0o644)
    assert "config secret" not in statuses(await doctor(box))


def test_name_matching() -> None:
    assert name_matches("relay.test", "RELAY.test.")
    assert name_matches("*.example.com", "smtp.example.com")
    assert not name_matches("*.example.com", "a.b.example.com")
    assert not name_matches("*.example.com", "example.com")
    assert not name_matches("example.com", "smtp.example.com")


def test_stray_files(tmp_path: Path) -> None:
    (tmp_path / "relaybox.db").write_text("")
    assert stray_files(tmp_path) == []
    if os.geteuid() == 0:
        os.chown(tmp_path / "relaybox.db", 65534, 65534)
        assert stray_files(tmp_path) == [tmp_path / "relaybox.db"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make files of other owners")
def test_readable_by() -> None:
    nobody = pwd.getpwnam("nobody")
    # Not under tmp_path: its parents are root-only, so nothing there is readable by nobody.
    base = Path(tempfile.mkdtemp(prefix="relaybox-readable-", dir="/tmp"))
    try:
        base.chmod(0o755)
        closed = base / "archive"
        closed.mkdir(mode=0o755)
        f = closed / "cert.pem"
        f.write_text("c")
        f.chmod(0o644)
        assert readable_by(f, nobody)
        f.chmod(0o600)
        assert not readable_by(f, nobody)
        f.chmod(0o640)
        os.chown(f, 0, nobody.pw_gid)
        assert readable_by(f, nobody)
        link = base / "live.pem"
        link.symlink_to(f)
        assert readable_by(link, nobody)
        closed.chmod(0o700)
        assert not readable_by(f, nobody)
        assert not readable_by(link, nobody)  # the link's target is behind a closed directory
    finally:
        shutil.rmtree(base)
