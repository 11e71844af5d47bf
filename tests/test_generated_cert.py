"""A generated certificate follows public_hostname; an operator's certificate is never written
(issue 13, item 3).

Without ``[tls] cert``, `relaybox serve` generates a self-signed pair into ``STATE/tls``, marked
as generated in its subject and issuer (``O=relaybox, OU=generated self-signed certificate``).
The first start with the default name made one for ``localhost``; setting public_hostname later
kept it, and `relaybox doctor` failed ``tls names``. Now every start and every SIGHUP reload
generates it again when it does not name public_hostname. What a listener serves is read from a
real TLS handshake on both listeners of a real `relaybox serve` (and, with ``workers = 2``, from
both workers), and a client that trusts the generated file checks it by the new name.
A configured ``tls.cert``, or a certificate in the state dir that relaybox did not generate, is
kept byte for byte whatever the name.
"""

from __future__ import annotations

import asyncio
import datetime
import signal
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay import config as config_mod
from relay.config import ConfigError
from relay.service import doctor, tlsutil
from tests.faults.procserver import ServerProcess
from tests.serverconf import CHEAP_ARGON2, Table, Value, toml
from tests.test_workers import held_port

BOTH = ("tls", "starttls")
NEW = "smtp.example.com"


def write_config(
    path: Path,
    state: Path,
    *,
    hostname: str | None = None,
    tls: tuple[Path, Path] | None = None,
    listen: tuple[tuple[int, str], ...] = ((0, "tls"), (0, "starttls")),
    workers: int | None = None,
) -> None:
    """A serve config; ``hostname`` None leaves public_hostname at its default (localhost),
    ``tls`` None leaves [tls] out (a generated certificate)."""
    top: dict[str, Value] = {"state_dir": state}
    if hostname is not None:
        top["public_hostname"] = hostname
    if workers is not None:
        top["workers"] = workers
    out = [toml(top)]
    for port, mode in listen:
        out.append("[[listen]]\n" + toml({"address": "127.0.0.1", "port": port, "mode": mode}))
    tables: dict[str, Table] = {
        "auth": {"failure_delay": "0s", "argon2": CHEAP_ARGON2},
        "dns": {"recheck_interval": "0s"},
        "delivery": {"paused": True},
    }
    if tls is not None:
        tables["tls"] = {"cert": tls[0], "key": tls[1]}
    out += [toml(table, name) for name, table in tables.items()]
    path.write_text("\n".join(out))


async def served(port: int, mode: str, ctx: ssl.SSLContext, name: str) -> x509.Certificate:
    """The certificate a new handshake on ``port`` gets (``name`` as the SNI / checked name)."""
    if mode == "tls":
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=name
        )
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for line, want in (
            (None, b"220"),
            (b"EHLO client.test\r\n", b"250 "),
            (b"STARTTLS\r\n", b"220"),
        ):
            if line is not None:
                writer.write(line)
            while not (got := await asyncio.wait_for(reader.readline(), 10)).startswith(want):
                assert got[:3] == want[:3], got  # 250- continuation lines
        await writer.start_tls(ctx, server_hostname=name)
    sslobj = writer.get_extra_info("ssl_object")
    assert isinstance(sslobj, ssl.SSLObject)
    der = sslobj.getpeercert(binary_form=True)
    writer.close()
    assert der is not None
    return x509.load_der_x509_certificate(der)


def unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def trusting(cert: Path) -> ssl.SSLContext:
    """A client that trusts ``cert`` and checks the name (what the README's msmtp does)."""
    return ssl.create_default_context(cafile=str(cert))


def san(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = ext.get_values_for_type(x509.DNSName)
    return set(dns) | {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def file_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


async def served_everywhere(server: ServerProcess, name: str) -> x509.Certificate:
    """What both listeners serve (the same certificate), with an unverifying client."""
    got = [await served(server.ports[mode], mode, unverified(), name) for mode in BOTH]
    assert der(got[0]) == der(got[1])
    return got[0]


async def lines_with(server: ServerProcess, part: str, count: int, within: float = 20) -> None:
    """Until ``count`` stderr lines contain ``part`` (one per worker), woken by each new line."""
    async with asyncio.timeout(within):
        while True:
            server._line.clear()  # the reader's new-line event (as wait_for_line uses it)
            if sum(part in line for line in server.lines) >= count:
                return
            await server._line.wait()


def tls_names(path: Path) -> doctor.Check:
    [check] = [
        c
        for c in doctor.check_tls(config_mod.load(path), datetime.datetime.now(datetime.UTC))
        if c.check == "tls names"
    ]
    return check


async def test_a_generated_certificate_follows_public_hostname_on_reload_and_restart(
    tmp_path: Path,
) -> None:
    """The issue's path: first start with the default name (localhost), then public_hostname set:
    a SIGHUP makes both listeners serve a certificate for the new name (a client trusting the
    generated file checks it by that name, and doctor's `tls names` passes); a restart after
    another change does the same."""
    path, state = tmp_path / "relaybox.toml", tmp_path / "state"
    cert_file = state / "tls" / "cert.pem"
    write_config(path, state)
    server = ServerProcess(path, listeners=2)
    try:
        await server.start()
        first = await served_everywhere(server, "localhost")
        assert "localhost" in san(first) and NEW not in san(first)
        assert der(first) == der(file_cert(cert_file))
        assert tlsutil.is_generated(first)
        assert tls_names(path).status == "pass"

        write_config(path, state, hostname=NEW)
        assert tls_names(path).status == "fail"  # what doctor said before the reload
        server.signal(signal.SIGHUP)
        await server.wait_for_line("reloaded config")
        line = await server.wait_for_line("public_hostname changed")
        assert "previous one named localhost" in line and str(cert_file) in line, line
        after = await served_everywhere(server, NEW)
        assert NEW in san(after) and der(after) == der(file_cert(cert_file))
        assert "localhost" in san(after)  # the loopback names stay: clients on the box
        for mode in BOTH:  # checked for real: trusted file, hostname verified
            assert der(await served(server.ports[mode], mode, trusting(cert_file), NEW)) == der(
                after
            )
        assert tls_names(path).status == "pass"

        server.signal(signal.SIGHUP)  # the name did not change: the same certificate
        await server.wait_for_line("reloaded config")
        assert len([x for x in server.lines if "reloaded config" in x]) >= 1
        assert der(await served_everywhere(server, NEW)) == der(after)
        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        await server.ensure_stopped()
    assert len([x for x in server.lines if "generated a self-signed" in x]) == 2

    write_config(path, state, hostname="mail.example.org")
    again = ServerProcess(path, listeners=2)
    try:
        await again.start()
        restarted = await served_everywhere(again, "mail.example.org")
        assert "mail.example.org" in san(restarted) and NEW not in san(restarted)
        assert der(restarted) == der(file_cert(cert_file))
        await again.wait_for_line("previous one named smtp.example.com")
    finally:
        await again.ensure_stopped()
    assert not [x for x in server.lines + again.lines if "Traceback" in x]


async def test_an_operators_configured_certificate_is_never_rewritten(
    tmp_path: Path, tls_files: tuple[Path, Path, Path]
) -> None:
    """``tls.cert`` names relay.test; public_hostname changes, the server reloads and restarts:
    the files keep every byte, nothing is generated, and the operator's certificate is served."""
    cert, key, _ca = tls_files
    before = {p: p.read_bytes() for p in (cert, key)}
    path, state = tmp_path / "relaybox.toml", tmp_path / "state"
    write_config(path, state, hostname="relay.test", tls=(cert, key))
    server = ServerProcess(path, listeners=2)
    try:
        await server.start()
        write_config(path, state, hostname=NEW, tls=(cert, key))
        server.signal(signal.SIGHUP)
        await server.wait_for_line("reloaded config")
        assert der(await served_everywhere(server, NEW)) == der(file_cert(cert))
        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
        await server.start()
        assert der(await served_everywhere(server, NEW)) == der(file_cert(cert))
    finally:
        await server.ensure_stopped()
    assert {p: p.read_bytes() for p in (cert, key)} == before
    assert not (state / "tls").exists()
    assert not [x for x in server.lines if "generated a self-signed" in x]


def self_signed(name: str, *, lifetime: datetime.timedelta) -> tuple[bytes, bytes]:
    """A self-signed ECDSA pair for ``name`` with only a CN: the shape of relaybox's certificates
    before the marker when ``lifetime`` is 825 days and 5 minutes (and an operator's otherwise)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now - datetime.timedelta(minutes=5) + lifetime)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


LEGACY = datetime.timedelta(days=825, minutes=5)


@pytest.mark.parametrize("kind", ["trustme", "self-signed, 90 days"])
async def test_an_operators_certificate_in_the_state_dir_is_kept(
    tmp_path: Path, tls_ca: trustme.CA, kind: str
) -> None:
    """No [tls] configured, but STATE/tls holds a pair relaybox did not generate (a CA-issued one,
    or a self-signed one that is not of relaybox's shape): kept byte for byte and served, with a
    warning that it does not name public_hostname, at start and on reload."""
    state = tmp_path / "state"
    (state / "tls").mkdir(parents=True)
    cert_file, key_file = state / "tls" / "cert.pem", state / "tls" / "key.pem"
    if kind == "trustme":
        issued = tls_ca.issue_cert("localhost")
        pair = issued.cert_chain_pems[0].bytes(), issued.private_key_pem.bytes()
    else:
        pair = self_signed("localhost", lifetime=datetime.timedelta(days=90))
    cert_file.write_bytes(pair[0])
    key_file.write_bytes(pair[1])
    path = tmp_path / "relaybox.toml"
    write_config(path, state, hostname=NEW)
    server = ServerProcess(path, listeners=2)
    try:
        await server.start()
        await server.wait_for_line("was not generated by relaybox")
        assert der(await served_everywhere(server, NEW)) == der(file_cert(cert_file))
        server.signal(signal.SIGHUP)
        await server.wait_for_line("reloaded config")
        assert der(await served_everywhere(server, NEW)) == der(file_cert(cert_file))
    finally:
        await server.ensure_stopped()
    assert (cert_file.read_bytes(), key_file.read_bytes()) == pair
    assert not [x for x in server.lines if "generated a self-signed" in x]


def generated_cfg(tmp_path: Path, hostname: str) -> config_mod.Config:
    return config_mod.from_dict(
        {"state_dir": str(tmp_path / "state"), "public_hostname": hostname}, source="(test)"
    )


def test_a_certificate_from_before_the_marker_is_regenerated_for_the_new_name(
    tmp_path: Path,
) -> None:
    """A certificate of the exact shape relaybox wrote before the marker (only a CN, SAN only the
    name, P-256, 825 days and 5 minutes) is relaybox's: the name changed, so it is generated
    again, now with the marker. The same shape for the current name is kept."""
    cfg = generated_cfg(tmp_path, NEW)
    cert_file, key_file = tlsutil.cert_paths(cfg)
    cert_file.parent.mkdir(parents=True)
    for name, kept in ((NEW, True), ("localhost", False)):
        pair = self_signed(name, lifetime=LEGACY)
        cert_file.write_bytes(pair[0])
        key_file.write_bytes(pair[1])
        assert tlsutil.is_generated(file_cert(cert_file))
        tlsutil.ensure_self_signed(cfg)
        assert ((cert_file.read_bytes(), key_file.read_bytes()) == pair) is kept, name
    new = file_cert(cert_file)  # generated again for NEW, with the marker
    assert NEW in san(new) and tlsutil.is_generated(new)
    assert not tlsutil._legacy_generated(new)
    unit = new.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [a.value for a in unit] == [tlsutil.GENERATED_UNIT]
    tlsutil.check_pair(cfg)


def test_a_generated_certificate_without_its_key_is_generated_again(tmp_path: Path) -> None:
    """A write cut short leaves the generated certificate without its key (the certificate is
    written first), or with another key: the next start generates the pair again. A key with no
    certificate at all is not relaybox's: the start fails naming both files, the key untouched."""
    cfg = generated_cfg(tmp_path, NEW)
    cert_file, key_file = tlsutil.cert_paths(cfg)
    tlsutil.ensure_self_signed(cfg)
    tlsutil.check_pair(cfg)
    key_file.unlink()
    tlsutil.ensure_self_signed(cfg)
    tlsutil.check_pair(cfg)
    key_file.write_bytes(self_signed(NEW, lifetime=LEGACY)[1])
    tlsutil.ensure_self_signed(cfg)
    tlsutil.check_pair(cfg)

    cert_file.unlink()
    lone = key_file.read_bytes()
    with pytest.raises(ConfigError) as err:
        tlsutil.ensure_self_signed(cfg)
    assert str(cert_file) in str(err.value) and str(key_file) in str(err.value)
    assert key_file.read_bytes() == lone and not cert_file.exists()


async def test_workers_regenerate_once_and_serve_the_same_certificate(tmp_path: Path) -> None:
    """``workers = 2``: the SIGHUP reaches both; one generates under the lock, the other finds
    the new name there and loads it. Every handshake, whichever worker takes it, gets the one
    certificate in the file."""
    path, state = tmp_path / "relaybox.toml", tmp_path / "state"
    with held_port() as port:
        write_config(path, state, listen=((port, "tls"),), workers=2)
        server = ServerProcess(path, listeners=1)
        try:
            await server.start()
            await server.wait_for_line("all 2 workers ready")
            write_config(path, state, hostname=NEW, listen=((port, "tls"),), workers=2)
            server.signal(signal.SIGHUP)
            await lines_with(server, "reloaded config", 2)
            cert_file = state / "tls" / "cert.pem"
            want = der(file_cert(cert_file))
            for _ in range(20):
                got = await served(port, "tls", trusting(cert_file), NEW)
                assert der(got) == want
        finally:
            await server.ensure_stopped()
    regenerated = [x for x in server.lines if "public_hostname changed" in x]
    assert len(regenerated) == 1, regenerated
