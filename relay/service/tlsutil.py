"""TLS for the listeners: one server SSLContext, reloadable in place.

With no certificate configured, a self-signed ECDSA P-256 certificate is generated into the state
dir on first start (ECDSA costs about half the handshake CPU of RSA-2048; DESIGN.md). SIGHUP calls
:func:`reload`, which loads the files again into the *same* context, so listeners need no restart
and new connections see the new certificate.
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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.config import Config

log = logging.getLogger("relaybox.tls")


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


def new_context(cfg: Config) -> ssl.SSLContext:
    """The server context without a certificate yet (loaded by :func:`reload`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if cfg.tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # Clients authenticate with AUTH, not certificates (aiosmtpd warns on anything else).
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def reload(ctx: ssl.SSLContext, cfg: Config) -> None:
    """Load the certificate files (again) into ``ctx``; raises OSError/SSLError if unusable."""
    cert_path, key_path = cert_paths(cfg)
    ctx.load_cert_chain(str(cert_path), str(key_path))


def certificate_info(cfg: Config) -> x509.Certificate:
    """The certificate in use: the first of its file (the rest is the chain). Raises OSError if
    the file cannot be read, ValueError if it holds no certificate or one that does not parse."""
    cert_path, _ = cert_paths(cfg)
    return x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
