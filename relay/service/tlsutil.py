"""TLS for the listeners: one server SSLContext for the process's life, its certificate swapped.

With no certificate configured, a self-signed ECDSA P-256 certificate is generated into the state
dir on first start (ECDSA costs about half the handshake CPU of RSA-2048; DESIGN.md).

Listeners (and STARTTLS sessions) hold one :class:`LiveContext`; each new handshake is handed the
context of the last certificate that loaded, switched in by an SNI callback (OpenSSL calls it
for every ClientHello, with or without a server name). SIGHUP calls :func:`reload`, which builds
a new context, checks that certificate and key exist, parse and match, and swaps only then: a bad
pair changes nothing, and a good one reaches new handshakes on every listener without a restart.

TLS 1.2 offers AEAD suites only (ECDHE with AES-GCM or ChaCha20-Poly1305): no CBC, no RSA key
exchange. TLS 1.3's suites are all AEAD.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import shutil
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.config import Config, ConfigError

log = logging.getLogger("relaybox.tls")

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # AEAD only; TLS 1.3 suites are set apart


def cert_paths(cfg: Config) -> tuple[Path, Path]:
    """The certificate and key in use: configured ones, else the generated pair in the state dir."""
    if cfg.tls.cert:
        return Path(cfg.tls.cert), Path(cfg.tls.key)
    return cfg.state_dir / "tls" / "cert.pem", cfg.state_dir / "tls" / "key.pem"


def ensure_self_signed(cfg: Config) -> None:
    """Generate the self-signed pair if no certificate is configured and none exists yet."""
    if cfg.tls.cert:
        return
    cert_path, key_path = cert_paths(cfg)
    if cert_path.exists() and key_path.exists():
        return
    tls_dir = cert_path.parent
    tls_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Written into a fresh directory renamed into place in one step: workers starting together
    # never read half a pair, and the first rename wins (the others discard theirs).
    tmp = Path(tempfile.mkdtemp(prefix=".tls-", dir=tls_dir.parent))
    try:
        _write_self_signed(cfg, tmp / cert_path.name, tmp / key_path.name)
        os.rename(tmp, tls_dir)
    except OSError:
        if not (cert_path.exists() and key_path.exists()):
            raise
        return  # another worker won the race
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning(
        "no TLS certificate configured: generated a self-signed one for %s at %s "
        "(clients will not trust it; set [tls] cert and key)",
        cfg.public_hostname,
        cert_path,
    )


def _write_self_signed(cfg: Config, cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cfg.public_hostname)])
    alt: list[x509.GeneralName] = [x509.DNSName(cfg.public_hostname)]
    try:
        alt.append(x509.IPAddress(ipaddress.ip_address(cfg.public_hostname)))
    except ValueError:
        pass
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class LiveContext(ssl.SSLContext):
    """The context listeners are given: it never changes, what it hands each handshake does."""

    current: ssl.SSLContext | None = None  # the last context that loaded; set by reload()

    def select(self, conn: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        """The SNI callback: this handshake goes on with the current certificate."""
        if self.current is not None:
            conn.context = self.current


def _configure(ctx: ssl.SSLContext, cfg: Config) -> None:
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if cfg.tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers(TLS12_CIPHERS)
    # Clients authenticate with AUTH, not certificates (aiosmtpd warns on anything else).
    ctx.verify_mode = ssl.CERT_NONE


def new_context(cfg: Config) -> LiveContext:
    """The listeners' context, without a certificate yet (:func:`reload` gives it one)."""
    ctx = LiveContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(ctx, cfg)
    ctx.sni_callback = ctx.select
    return ctx


def reload(ctx: LiveContext, cfg: Config) -> None:
    """Swap in the certificate files of ``cfg`` for new handshakes, once they load and check
    (:func:`loaded`); raises ConfigError naming the file, and then nothing has changed."""
    ctx.current = loaded(cfg)


def loaded(cfg: Config) -> ssl.SSLContext:
    """A new server context holding the certificate and key in use, checked (:func:`check_pair`).
    Raises ConfigError naming the file."""
    cert_path, key_path = check_pair(cfg)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(ctx, cfg)
    try:
        # Never OpenSSL's passphrase prompt (it would read the terminal): a key that turned
        # encrypted since the check fails instead.
        ctx.load_cert_chain(str(cert_path), str(key_path), password=_no_passphrase)
    except (OSError, ssl.SSLError) as exc:  # the files changed since the check
        raise ConfigError(f"{cert_path} / {key_path}: {exc}") from None
    return ctx


def _no_passphrase() -> bytes:
    raise ConfigError("tls.key: encrypted (relaybox needs a key without a passphrase)")


def check_pair(cfg: Config) -> tuple[Path, Path]:
    """Check that the certificate and key in use exist, parse, and belong together; their
    paths. Raises ConfigError naming the file that is missing, unreadable or wrong."""
    cert_path, key_path = cert_paths(cfg)
    cert_name, key_name = ("tls.cert", "tls.key") if cfg.tls.cert else ("certificate", "key")
    cert_pem, key_pem = _read(cert_path, cert_name), _read(key_path, key_name)
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise ConfigError(f"{cert_name}: no certificate in {cert_path} (expected PEM)") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # encrypted
        raise ConfigError(
            f"{key_name}: {key_path} is encrypted (relaybox needs a key without a passphrase)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{key_name}: no private key in {key_path} (expected PEM)") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ConfigError(f"{key_name}: {key_path} does not match the certificate in {cert_path}")
    return cert_path, key_path


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None


def certificate_info(cfg: Config) -> x509.Certificate:
    """The certificate in use: the first of its file (the rest is the chain). Raises OSError if
    the file cannot be read, ValueError if it holds no certificate or one that does not parse."""
    cert_path, _ = cert_paths(cfg)
    return x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
