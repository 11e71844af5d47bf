"""Secrets stay secret: passwords, AUTH payloads, password hashes and DKIM private keys never
appear in logs, SMTP replies, error messages or ``--json`` output (issue 6, item 6).

Every test of the suite is already checked by the autouse fixture in tests/conftest.py (logs
captured, SMTP replies read through tests/dialogue.py, anything passed to ``leaks.observe``).
This module proves that check can fail, and drives the places where secrets are handled: the
admin CLI's ``--json`` output and errors, and `relaybox serve --log-level DEBUG` as a real process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import ssl
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from admin.cli import cli
from relay import config as config_mod
from relay.config import Config
from relay.store import domains, logins, shared
from tests import leaks
from tests.dialogue import Dialogue, b64, plain
from tests.faults.procserver import ServerProcess
from tests.hostile.kit import LOGIN, message
from tests.serverconf import smarthost, write_serve_config
from tests.sink import Sink
from tests.userhelpers import make_domain_sync, seed_user

# --- the checker itself -------------------------------------------------------------------------


def test_the_leak_check_can_fail(caplog: pytest.LogCaptureFixture) -> None:
    """Each form of a registered secret, in a record, a traceback or observed output, is found
    by the very function the autouse fixture runs; unregistered text is not."""
    password = leaks.add("Hunter2-but-longer")
    leaks.add_auth_payload(LOGIN, password)
    pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIBvQbEDcSrhjA2ZQzO+B9+vIs8x3DrRlRf3n5pNOFZZn\n-----END PRIVATE KEY-----\n"  # noqa: E501 (a made-up key)
    leaks.add_pem(pem)
    log = logging.getLogger("relaybox.test")
    cases = [
        f"auth failed password={password}",
        f"line >> AUTH PLAIN {plain(LOGIN, password)}",
        f"line >> {b64(password)}",
        f"params ({pem!r},)",  # a repr: newlines escaped
    ]
    for text in cases:
        caplog.clear()
        log.info("%s", text)
        assert leaks.check(caplog.records), text
    caplog.clear()
    try:
        raise ValueError(f"cannot use {password}")
    except ValueError:
        log.exception("boom")
    assert leaks.check(caplog.records)
    caplog.clear()
    assert leaks.check([]) == []
    log.info("auth failed user=app@example.com reason=bad credentials")
    assert leaks.check(caplog.records) == []
    leaks.observe(f"535 5.7.8 {password}")
    assert leaks.check([]) == [password]
    leaks.reset()  # leave nothing for the autouse check: this test's leaks were on purpose
    caplog.clear()


# --- the admin CLI ------------------------------------------------------------------------------


def run_cli(config: Path, *args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--config", str(config), *args], input=stdin)
    return result.exit_code, result.output


async def stored_secrets(cfg: Config, login: str, domain: str) -> tuple[str, str]:
    """The password hash and the DKIM private key as stored (to look for them in output)."""
    db = await shared.open_main(cfg)
    try:
        creds = await logins.credentials(db, login)
        key = await domains.signing_key(db, domain)
    finally:
        await db.close()
    assert creds is not None and key is not None
    pem = key.private_pem
    return creds.current_hash, pem if isinstance(pem, str) else pem.decode()


def test_cli_output_and_errors_carry_no_secret(cli_config: Path) -> None:
    text = cli_config.read_text() + (
        '\n[delivery]\nmode = "smarthost"\n[delivery.smarthost]\nhost = "smtp.upstream.test"\n'
        'username = "relay"\npassword = "Upstream-secret-42"\n'
    )
    cli_config.write_text(text)
    leaks.add("Upstream-secret-42")
    cfg = config_mod.load(cli_config)
    make_domain_sync(cfg, "example.com", now=time.time())

    rc, out = run_cli(cli_config, "user", "add", LOGIN, "--json")
    assert rc == 0, out
    password = json.loads(out)["password"]  # the one time a password is shown
    leaks.add_auth_payload(LOGIN, password)
    password_hash, pem = asyncio.run(stored_secrets(cfg, LOGIN, "example.com"))
    leaks.add(password_hash)
    leaks.add(password_hash.rsplit("$", 1)[1])  # the digest alone
    leaks.add_pem(pem)

    outputs = [
        run_cli(cli_config, "user", "show", LOGIN, "--json"),
        run_cli(cli_config, "user", "show", LOGIN),
        run_cli(cli_config, "user", "list", "--json"),
        run_cli(cli_config, "domain", "show", "example.com", "--json"),
        run_cli(cli_config, "domain", "list", "--json"),
        run_cli(cli_config, "audit", "--json"),
        run_cli(cli_config, "config", "show", "--json"),
        run_cli(cli_config, "config", "show"),
    ]
    for rc, out in outputs:
        assert rc == 0, out
        leaks.observe(out)
    assert "$argon2" not in "".join(out for _rc, out in outputs)

    # A reset with --password-stdin never echoes the password, nor do policy refusals.
    new = leaks.add("A-new-password-for-the-app-1")
    rc, out = run_cli(
        cli_config, "user", "reset-password", LOGIN, "--password-stdin", "--json", stdin=new
    )
    assert rc == 0, out
    assert json.loads(out)["password"] is None
    leaks.observe(out)
    for bad in ("Short-pw-1", "x" * 2000, "tab\tinside-a-password", "nul\0inside-a-password"):
        leaks.add(bad)
        rc, out = run_cli(cli_config, "user", "add", "b@example.com", "--password-stdin", stdin=bad)
        assert rc == 1 and len(out.strip().splitlines()) == 1, out
        leaks.observe(out)
    # The autouse check now searches all of it, and the captured logs, for every secret above.


# --- the server, at DEBUG -----------------------------------------------------------------------


async def test_serve_at_debug_logs_no_secret(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], sink: Sink
) -> None:
    """`relaybox serve --log-level DEBUG`: logins (right, wrong, PLAIN, LOGIN, cancelled),
    a signed message, a delivery that fails at the upstream's AUTH, a clean stop. Nothing
    secret in its whole stderr, even with every library's DEBUG logging on."""
    upstream_password = leaks.add("Upstream-secret-42")
    path = write_serve_config(
        tmp_path,
        tls_files,
        listen=[(0, "tls"), (0, "starttls")],
        delivery=smarthost(sink.port, command_timeout="5s", login=("relay", upstream_password)),
    )
    cfg = config_mod.load(path)
    password = await seed_user(cfg, LOGIN, now=time.time())
    wrong = leaks.add("Wrong-but-secret-too-77")
    leaks.add_auth_payload(LOGIN, wrong)
    password_hash, pem = await stored_secrets(cfg, LOGIN, "example.com")
    leaks.add(password_hash.rsplit("$", 1)[1])
    leaks.add_pem(pem)

    server = ServerProcess(path, listeners=2, serve_args=["--log-level", "DEBUG"])
    try:
        await server.start()
        ctx = ssl.create_default_context(cafile=str(tls_files[2]))
        d = await Dialogue.open(server.ports["tls"], tls=ctx)
        await d.expect_after("EHLO c", "250")
        await d.expect_after(f"AUTH PLAIN {plain(LOGIN, wrong)}", "535")
        await d.expect_after("AUTH LOGIN", "334")
        await d.expect_after(b64(LOGIN), "334")
        await d.expect_after(b64(wrong), "535")
        await d.expect_after("AUTH LOGIN", "334")
        await d.expect_after("*", "501")
        await d.close()
        d = await Dialogue.open(server.ports["starttls"])
        await d.expect_after("EHLO c", "250")
        await d.expect_after(f"AUTH PLAIN {plain(LOGIN, password)}", "538")
        await d.close()
        d = await Dialogue.open(server.ports["tls"], tls=ctx)
        await d.login(LOGIN, password)
        await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250")
        await d.expect_after("RCPT TO:<bob@dest.test>", "250")
        await d.expect_after("DATA", "354")
        await d.expect_after(message() + b".\r\n", "250 2.0.0 queued as")
        await d.close()
        # The upstream offers no AUTH: the delivery attempt fails there and is deferred.
        await server.wait_for_line("deferred id=")
        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        await server.ensure_stopped()
    log_text = "\n".join(server.lines)
    assert "DEBUG" in log_text  # the level really was DEBUG
    assert "auth failed user=app@example.com" in log_text
    leaks.observe(log_text)  # checked for every secret above by the autouse fixture
    assert not leaks.find_in(log_text)


def test_base64_forms_are_registered() -> None:
    """A secret is looked for as sent over SMTP (base64, with or without padding) too."""
    secret = leaks.add("Pad-me-please-1")
    encoded = base64.b64encode(secret.encode()).decode()
    assert leaks.find_in(f"334 {encoded}") and leaks.find_in(encoded.rstrip("="))
    leaks.reset()
