"""TLS and config hardening (issue 12, items 7 and 11).

- A reload (SIGHUP) builds a new context and checks certificate and key before anything changes:
  a bad pair leaves both listeners serving the running certificate, a good one reaches new
  handshakes on both.
- A certificate or key that is missing, does not parse or does not match is named, by `serve`,
  by `config check` (which checks them) and by a reload's log line.
- TLS 1.2 offers AEAD suites only (ECDHE with AES-GCM or ChaCha20-Poly1305): a client offering
  only CBC suites is refused on both listeners, by Python's ssl and by `openssl s_client`.
- A smarthost password sent in clear needs the operator's explicit yes
  (``delivery.smarthost.allow_plaintext_auth``); a config file holding a password that others can
  read is warned about, once, when `serve` starts (``relaybox doctor`` checks it too).
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from admin.cli import cli
from relay import config as config_mod
from relay.config import ConfigError
from tests import procs
from tests.dialogue import Dialogue
from tests.faults.procserver import ServerProcess, relaybox_argv
from tests.relayserver import RelayHandle
from tests.serverconf import serve_config

BOTH = ("tls", "starttls")


async def served(port: int, mode: str, ctx: ssl.SSLContext) -> bytes:
    """The certificate (DER) a listener serves to a new handshake."""
    if mode == "tls":
        d = await Dialogue.open(port, tls=ctx)
    else:
        d = await Dialogue.open(port)
        await d.expect_after("EHLO client.test", "250")
        await d.starttls(ctx)
    sslobj = d.writer.get_extra_info("ssl_object")
    assert isinstance(sslobj, ssl.SSLObject)
    der = sslobj.getpeercert(binary_form=True)
    await d.close()
    assert der is not None
    return der


def client(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


# --- reload (item 7) ----------------------------------------------------------------------------


async def test_sighup_with_a_key_that_does_not_match_keeps_both_listeners_serving(
    tmp_path: Path, tls_ca: trustme.CA, tls_files: tuple[Path, Path, Path]
) -> None:
    """The issue's case, on `relaybox serve`: the new certificate whose key is another's is
    refused whole (the log names both files), both listeners keep serving the running
    certificate; the matching key then reloads, and new handshakes on both get the new one."""
    cert, key, ca = tls_files
    path = tmp_path / "relaybox.toml"
    path.write_text(
        serve_config(
            state=tmp_path / "state", cert=cert, key=key, listen=[(0, "tls"), (0, "starttls")]
        )
    )
    server = ServerProcess(path, listeners=2)
    try:
        await server.start()
        running = {mode: await served(server.ports[mode], mode, client(ca)) for mode in BOTH}
        renewed = tls_ca.issue_cert("relay.test", "127.0.0.1", "localhost")
        renewed.cert_chain_pems[0].write_to_path(str(cert))  # the key is still the old one

        server.signal(signal.SIGHUP)
        line = await server.wait_for_line("reload failed")
        for mode in BOTH:
            assert await served(server.ports[mode], mode, client(ca)) == running[mode], mode
        assert str(key) in line and str(cert) in line, line

        renewed.private_key_pem.write_to_path(str(key))
        server.signal(signal.SIGHUP)
        await server.wait_for_line("reloaded config")
        new = der_of(renewed.cert_chain_pems[0].bytes())
        for mode in BOTH:
            assert await served(server.ports[mode], mode, client(ca)) == new, mode
        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        await server.ensure_stopped()
    assert not [line for line in server.lines if "Traceback" in line]


@pytest.mark.parametrize("bad", ["cert missing", "key missing", "key garbage", "cert garbage"])
async def test_a_failed_reload_changes_nothing_and_names_the_file(
    relay: RelayHandle,
    tls_files: tuple[Path, Path, Path],
    bad: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert, key, ca = tls_files
    running = {mode: await served(relay.port(mode), mode, client(ca)) for mode in BOTH}
    named = cert if bad.startswith("cert") else key
    if bad.endswith("missing"):
        named.unlink()
    else:
        named.write_text("-----BEGIN NOTHING-----\nzz\n-----END NOTHING-----\n")
    await relay.server.reload(relay.server.cfg, notify=False)
    [line] = [r.getMessage() for r in caplog.records if "reload failed" in r.getMessage()]
    assert str(named) in line, line
    for mode in BOTH:
        assert await served(relay.port(mode), mode, client(ca)) == running[mode], mode


async def test_serve_names_a_missing_certificate_or_key(
    tmp_path: Path, tls_files: tuple[Path, Path, Path]
) -> None:
    cert, key, _ca = tls_files
    for missing in (tmp_path / "no-cert.pem", tmp_path / "no-key.pem"):
        path = tmp_path / "relaybox.toml"
        pair = (missing, key) if missing.name == "no-cert.pem" else (cert, missing)
        path.write_text(serve_config(state=tmp_path / "state", cert=pair[0], key=pair[1]))
        proc = await procs.spawn(
            *relaybox_argv(), "--config", str(path), "serve",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1
        last = err.decode().strip().splitlines()[-1]
        assert last.startswith("Error: cannot start: ") and str(missing) in last, last
        assert "Traceback" not in err.decode()


def _pairs(tmp_path: Path, ca: trustme.CA) -> dict[str, tuple[Path, Path]]:
    """Certificate/key pairs, each wrong in one way (and one right)."""
    one = ca.issue_cert("relay.test")
    other = ca.issue_cert("relay.test")
    files = {
        "cert.pem": one.cert_chain_pems[0].bytes(),
        "key.pem": one.private_key_pem.bytes(),
        "fullchain.pem": one.cert_chain_pems[0].bytes() + ca.cert_pem.bytes(),
        "other-key.pem": other.private_key_pem.bytes(),
        "garbage.pem": b"not a pem file\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    d = tmp_path
    return {
        "ok": (d / "cert.pem", d / "key.pem"),
        "ok fullchain": (d / "fullchain.pem", d / "key.pem"),
        "cert missing": (d / "missing-cert.pem", d / "key.pem"),
        "key missing": (d / "cert.pem", d / "missing-key.pem"),
        "cert garbage": (d / "garbage.pem", d / "key.pem"),
        "key garbage": (d / "cert.pem", d / "garbage.pem"),
        "key not the cert's": (d / "cert.pem", d / "other-key.pem"),
        "key given as cert": (d / "key.pem", d / "key.pem"),
    }


@pytest.mark.parametrize(
    ("case", "named", "why"),
    [
        ("ok", None, None),
        ("ok fullchain", None, None),
        ("cert missing", "cert", "No such file or directory"),
        ("key missing", "key", "No such file or directory"),
        ("cert garbage", "cert", "no certificate"),
        ("key garbage", "key", "no private key"),
        ("key not the cert's", "key", "does not match"),
        ("key given as cert", "cert", "no certificate"),
    ],
)
def test_config_check_checks_certificate_and_key(
    tmp_path: Path, case: str, named: str | None, why: str | None
) -> None:
    cert, key = _pairs(tmp_path, trustme.CA())[case]
    path = tmp_path / "relaybox.toml"
    path.write_text(serve_config(state=tmp_path / "state", cert=cert, key=key))
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    if named is None:
        assert result.exit_code == 0 and result.stdout == f"ok: {path}\n", result.output
        return
    assert result.exit_code == 1, result.output
    [line] = result.stderr.splitlines()
    shown = cert if named == "cert" else key
    assert str(shown) in line and f"tls.{named}" in line and why in line, line


# --- cipher suites (item 11) --------------------------------------------------------------------


def _tls12_client(ca: Path, ciphers: str) -> ssl.SSLContext:
    ctx = client(ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)
    return ctx


def cbc_suites() -> str:
    """Every TLS 1.2 suite without AEAD that this OpenSSL's client side knows."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    names = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2" and not c["aead"]]
    assert "ECDHE-ECDSA-AES128-SHA256" in names  # the CBC suite a default server offered
    return ":".join(names)


@pytest.mark.parametrize("mode", BOTH)
async def test_tls12_offers_aead_suites_only(
    relay: RelayHandle, tls_files: tuple[Path, Path, Path], mode: str
) -> None:
    ca = tls_files[2]
    # Refused: a handshake failure alert, or the connection closed during the handshake.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await served(relay.port(mode), mode, _tls12_client(ca, cbc_suites()))
    for aead in ("ECDHE+AESGCM", "ECDHE+CHACHA20"):
        assert await served(relay.port(mode), mode, _tls12_client(ca, aead))
    # TLS 1.3 (AEAD by definition) still works with a default client.
    assert await served(relay.port(mode), mode, client(ca))


@pytest.mark.parametrize("mode", BOTH)
async def test_openssl_s_client_with_a_cbc_suite_is_refused(
    relay: RelayHandle, tls_files: tuple[Path, Path, Path], mode: str
) -> None:
    ca = tls_files[2]

    async def s_client(cipher: str) -> tuple[int, str]:
        argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{relay.port(mode)}", "-brief"]
        argv += ["-tls1_2", "-cipher", cipher, "-CAfile", str(ca), "-servername", "relay.test"]
        if mode == "starttls":
            argv += ["-starttls", "smtp"]
        proc = await procs.spawn(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(b"QUIT\r\n"), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode("utf-8", "replace")

    rc, out = await s_client(
        "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA256"
    )
    assert rc != 0 and "CONNECTION ESTABLISHED" not in out, out
    rc, out = await s_client("ECDHE-ECDSA-AES128-GCM-SHA256")
    assert rc == 0 and "ECDHE-ECDSA-AES128-GCM-SHA256" in out, out


# --- the smarthost password (item 11) -----------------------------------------------------------


SMARTHOST = '[delivery.smarthost]\nhost = "smtp.upstream.test"\nsecurity = "{security}"\n'
CREDENTIALS = 'username = "relay"\npassword = "Upstream-secret-42"\n'


@pytest.mark.parametrize("security", ["none"])
def test_a_password_in_clear_is_refused_unless_allowed(tmp_path: Path, security: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(SMARTHOST.format(security=security) + CREDENTIALS)
    with pytest.raises(ConfigError, match=r"delivery\.smarthost\.allow_plaintext_auth") as err:
        config_mod.load(p)
    assert "Upstream-secret-42" not in str(err.value)
    p.write_text(
        SMARTHOST.format(security=security) + CREDENTIALS + "allow_plaintext_auth = true\n"
    )
    assert config_mod.load(p).delivery.smarthost.allow_plaintext_auth is True
    for fine in ("starttls", "tls"):
        p.write_text(SMARTHOST.format(security=fine) + CREDENTIALS)
        assert config_mod.load(p).delivery.smarthost.username == "relay"
    p.write_text(SMARTHOST.format(security=security))  # no username: nothing to leak
    assert config_mod.load(p).delivery.smarthost.security == "none"


async def test_serve_warns_once_about_a_readable_config_holding_a_password(
    tmp_path: Path, tls_files: tuple[Path, Path, Path]
) -> None:
    cert, key, _ca = tls_files
    path = tmp_path / "relaybox.toml"
    text = serve_config(state=tmp_path / "state", cert=cert, key=key, delivery={"paused": True})
    for mode, warned in ((0o644, True), (0o600, False)):
        path.write_text(text + "\n" + SMARTHOST.format(security="starttls") + CREDENTIALS)
        os.chmod(path, mode)
        server = ServerProcess(path, listeners=1)
        try:
            await server.start()  # the warning comes before the listening line, on stderr too
        finally:
            await server.ensure_stopped()
        warnings = [line for line in server.lines if "WARNING" in line and str(path) in line]
        assert len(warnings) == (1 if warned else 0), server.lines
        if warned:
            assert "delivery.smarthost.password" in warnings[0] and "0644" in warnings[0]
        assert not [line for line in server.lines if "Upstream-secret-42" in line]
