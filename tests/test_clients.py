"""The real client tools (swaks, msmtp, curl) against the real server, both listeners.

Each tool verifies the server certificate against the test CA, authenticates, and submits; a wrong
password must make each tool fail. The tools are installed by scripts/test (apt-get).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from tests import leaks, procs
from tests.relayserver import RelayHandle

LOGIN = "app@example.com"
MESSAGE = "From: app@example.com\r\nTo: someone@dest.test\r\nSubject: tool test\r\n\r\nHello.\r\n"


async def run(*argv: str, stdin: bytes = b"") -> tuple[int, str]:
    if shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is not installed (scripts/test installs it with apt-get)")
    proc = await procs.spawn(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


def swaks_argv(relay: RelayHandle, mode: str, password: str, mech: str) -> list[str]:
    return [
        "swaks",
        "--server", "127.0.0.1",
        "--port", str(relay.port(mode)),
        "--tlsc" if mode == "tls" else "--tls",
        "--tls-verify", "--tls-ca-path", str(relay.ca_path),
        "--auth", mech, "--auth-user", LOGIN, "--auth-password", password,
        "--from", LOGIN, "--to", "someone@dest.test",
        "--h-From", LOGIN,
        "--ehlo", "client.test",
        "--timeout", "20",
    ]  # fmt: skip


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_swaks(relay: RelayHandle, mode: str, mech: str) -> None:
    password = await relay.add_user(LOGIN)
    rc, out = await run(*swaks_argv(relay, mode, password, mech))
    assert rc == 0, out
    assert "250 2.0.0 queued as" in out
    assert "235 2.7.0" in out
    rc, out = await run(*swaks_argv(relay, mode, leaks.add("Wrong-password-99"), mech))
    assert rc != 0
    assert "535 5.7.8" in out


def msmtp_config(relay: RelayHandle, tmp_path: Path, mode: str, password: str, mech: str) -> Path:
    conf = tmp_path / f"msmtprc-{mode}-{mech}"
    conf.write_text(
        "\n".join(
            [
                "account relay",
                "host 127.0.0.1",
                f"port {relay.port(mode)}",
                "tls on",
                f"tls_starttls {'on' if mode == 'starttls' else 'off'}",
                f"tls_trust_file {relay.ca_path}",
                f"auth {mech.lower()}",
                f"user {LOGIN}",
                f"password {password}",
                f"from {LOGIN}",
                "domain client.test",
                "timeout 20",
                "account default : relay",
                "",
            ]
        )
    )
    conf.chmod(0o600)
    return conf


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_msmtp(relay: RelayHandle, tmp_path: Path, mode: str, mech: str) -> None:
    password = await relay.add_user(LOGIN)
    conf = msmtp_config(relay, tmp_path, mode, password, mech)
    rc, out = await run("msmtp", "-C", str(conf), "someone@dest.test", stdin=MESSAGE.encode())
    assert rc == 0, out
    bad = msmtp_config(relay, tmp_path, mode, leaks.add("Wrong-password-99"), mech)
    rc, out = await run("msmtp", "-C", str(bad), "someone@dest.test", stdin=MESSAGE.encode())
    assert rc != 0
    assert "535" in out or "authentication failed" in out.lower()


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_curl(relay: RelayHandle, tmp_path: Path, mode: str) -> None:
    password = await relay.add_user(LOGIN)
    msg = tmp_path / "msg.eml"
    msg.write_bytes(MESSAGE.encode())
    scheme = "smtps" if mode == "tls" else "smtp"

    def argv(pw: str) -> list[str]:
        return [
            "curl", "--silent", "--show-error", "--verbose",
            "--url", f"{scheme}://127.0.0.1:{relay.port(mode)}/client.test",
            "--ssl-reqd", "--cacert", str(relay.ca_path),
            "--mail-from", LOGIN, "--mail-rcpt", "someone@dest.test",
            "--upload-file", str(msg),
            "--user", f"{LOGIN}:{pw}",
            "--max-time", "20",
        ]  # fmt: skip

    rc, out = await run(*argv(password))
    assert rc == 0, out
    assert "250 2.0.0 queued as" in out
    rc, out = await run(*argv(leaks.add("Wrong-password-99")))
    assert rc != 0
    assert "535 5.7.8" in out
