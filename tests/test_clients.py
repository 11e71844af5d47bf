"""The real client tools (swaks, msmtp, curl) against the real server, both listeners.

Each tool verifies the server certificate against the test CA, authenticates, and submits; a wrong
password must make each tool fail. The tools are installed by scripts/test (apt-get).
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import pytest

from relay.store import spool as spool_mod
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


@pytest.mark.parametrize("bare_newline", ["normalize", "reject"])
async def test_curl_uploads_a_file_with_lf_line_endings(
    relay: RelayHandle, tmp_path: Path, bare_newline: str
) -> None:
    """curl sends a file as it is: an LF-only file (every Unix editor's) has bare LFs, which the
    default ``limits.bare_newline = "normalize"`` takes as line ends (Postfix 3.9's default) and
    stores as CRLF; ``"reject"`` refuses them (554 5.6.0)."""
    if bare_newline == "reject":
        cfg = relay.server.cfg
        await relay.server.reload(
            dataclasses.replace(
                cfg, limits=dataclasses.replace(cfg.limits, bare_newline=bare_newline)
            ),
            notify=False,
        )
    password = await relay.add_user(LOGIN)
    msg = tmp_path / "msg.txt"
    text = MESSAGE.replace("\r\n", "\n") + "a line of text\n" * 200
    msg.write_bytes(text.encode())
    rc, out = await run(
        "curl", "--silent", "--show-error", "--verbose",
        "--url", f"smtp://127.0.0.1:{relay.port('starttls')}/client.test",
        "--ssl-reqd", "--cacert", str(relay.ca_path),
        "--mail-from", LOGIN, "--mail-rcpt", "someone@dest.test",
        "--upload-file", str(msg),
        "--user", f"{LOGIN}:{password}",
        "--max-time", "20",
    )  # fmt: skip
    spool = relay.server.spool
    assert spool is not None
    msgs = await spool.list_messages(spool_mod.STATES)
    if bare_newline == "reject":
        assert rc != 0
        assert "554 5.6.0" in out, out
        assert msgs == []
        return
    assert rc == 0, out
    assert "250 2.0.0 queued as" in out
    (info,) = msgs
    stored = await spool.load(info.id)
    assert stored is not None and stored.body is not None
    body = stored.body
    assert body.count(b"\n") == body.count(b"\r\n") == body.count(b"\r")
    assert b"\r\nSubject: tool test\r\n" in body
    assert body.count(b"a line of text\r\n") == 200
