"""TLS for the listeners: one server SSLContext for the process's life, its certificate swapped.

With no certificate configured, a self-signed ECDSA P-256 certificate is generated into the state
dir (``tls/cert.pem``, ``tls/key.pem``) on first start (ECDSA costs about half the handshake CPU of
RSA-2048; DESIGN.md). It names ``public_hostname`` and the loopback names (localhost, 127.0.0.1,
::1: a client on the box can check it by address), and it follows ``public_hostname``: at every
start and SIGHUP reload (:func:`ensure_self_signed`) a generated certificate that does not name
it is generated again (also one that expires within 30 days, or whose key is missing or not its
own). What marks a certificate as generated is in the certificate itself: its subject and issuer
are ``CN=<name>, O=relaybox, OU=generated self-signed certificate`` (the marker, visible in
``openssl x509 -noout -subject``); certificates of relaybox releases before the marker are
recognised by their exact shape (:func:`_legacy_generated`). Any other file there, and a
configured ``tls.cert``, is the operator's and never written.

Listeners (and STARTTLS sessions) hold one :class:`LiveContext`; each new handshake is handed the
context of the last certificate that loaded, switched in by an SNI callback (OpenSSL calls it
for every ClientHello, with or without a server name). SIGHUP calls :func:`reload`, which builds
a new context, checks that certificate and key exist, parse and match, and swaps only then: a bad
pair changes nothing, and a good one reaches new handshakes on every listener without a restart.

TLS 1.2 offers AEAD suites only (ECDHE with AES-GCM or ChaCha20-Poly1305): no CBC, no RSA key
exchange. TLS 1.3's suites are all AEAD.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.config import Config, ConfigError

log = logging.getLogger("relaybox.tls")

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # AEAD only; TLS 1.3 suites are set apart

GENERATED_ORG = "relaybox"
GENERATED_UNIT = "generated self-signed certificate"  # the marker (subject and issuer OU)
GENERATED_DAYS = 825
RENEW_BEFORE = datetime.timedelta(
    days=30
)  # a generated certificate this close to expiry is renewed
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def cert_paths(cfg: Config) -> tuple[Path, Path]:
    """The certificate and key in use: configured ones, else the generated pair in the state dir."""
    if cfg.tls.cert:
        return Path(cfg.tls.cert), Path(cfg.tls.key)
    return cfg.state_dir / "tls" / "cert.pem", cfg.state_dir / "tls" / "key.pem"


def ensure_self_signed(cfg: Config) -> None:
    """With no certificate configured: see that the state dir holds a pair for public_hostname.

    Generates it on first start, and again when the certificate there is one relaybox generated
    (:func:`is_generated`) that does not name ``public_hostname`` (the name changed), expires
    within :data:`RENEW_BEFORE`, or whose key is missing or not its own (a write cut short). A
    certificate relaybox did not generate is left as it is (a warning when it does not name
    ``public_hostname``). Workers of ``workers = N`` take turns under a lock file, so only the
    first of them writes. Raises OSError when the files cannot be written, ConfigError when a
    key is there without a certificate.
    """
    if cfg.tls.cert:
        return
    cert_path, key_path = cert_paths(cfg)
    tls_dir = cert_path.parent
    tls_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    with _locked(tls_dir / ".lock"):
        why = _why_generate(cert_path, key_path, cfg.public_hostname)
        if why is None:
            return
        _write_self_signed(cfg, cert_path, key_path)
    log.warning(
        "no TLS certificate configured: generated a self-signed one for %s at %s (%s); "
        "clients will not trust it: set [tls] cert and key",
        cfg.public_hostname,
        cert_path,
        why,
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _why_generate(cert_path: Path, key_path: Path, hostname: str) -> str | None:
    """Why the pair must be (re)generated, or None to keep what is there."""
    if not cert_path.exists():
        if key_path.exists():
            raise ConfigError(
                f"certificate: {cert_path} is missing but {key_path} exists: put its certificate"
                " there, or remove the key and relaybox generates a pair"
            )
        return "there was none"
    try:
        cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    except (OSError, ValueError):
        return None  # not one relaybox wrote (it writes whole files): check_pair names it
    if not is_generated(cert):
        if not names_host(cert, hostname):
            log.warning(
                "%s was not generated by relaybox: kept as it is, though it does not name "
                "public_hostname %s",
                cert_path,
                hostname,
            )
        return None
    if not names_host(cert, hostname):
        return f"public_hostname changed: the previous one named {_common_name(cert)}"
    if cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < RENEW_BEFORE:
        return f"the previous one expires on {cert.not_valid_after_utc:%Y-%m-%d}"
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return f"the key {key_path} was missing or unreadable"
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        return f"the key {key_path} did not match it"
    return None


def is_generated(cert: x509.Certificate) -> bool:
    """Whether relaybox generated ``cert``: the marker in its subject and issuer, or the exact
    shape of one from before the marker."""
    subject = cert.subject
    marked = (
        cert.issuer == subject
        and [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        == [GENERATED_ORG]
        and [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
        == [GENERATED_UNIT]
    )
    return marked or _legacy_generated(cert)


def _legacy_generated(cert: x509.Certificate) -> bool:
    """A certificate of a release before the marker: subject = issuer = only a CN, the SAN only
    that name (and its IP form), an ECDSA P-256 key that signed it, valid 825 days and 5 min."""
    attrs = list(cert.subject)
    if cert.issuer != cert.subject or len(attrs) != 1 or attrs[0].oid != NameOID.COMMON_NAME:
        return False
    name = str(attrs[0].value)
    try:
        ip: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(name))]
    except ValueError:
        ip = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    key = cert.public_key()
    if list(san) != [x509.DNSName(name), *ip] or not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    if key.curve.name != "secp256r1" or lifetime != datetime.timedelta(days=825, minutes=5):
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def names_host(cert: x509.Certificate, hostname: str) -> bool:
    """Whether ``cert``'s SAN holds ``hostname`` exactly (as a DNS name, or as an address)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    wanted = hostname.lower().rstrip(".")
    if wanted in (n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)):
        return True
    try:
        return ipaddress.ip_address(hostname) in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        return False


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else "another name"


def _write_self_signed(cfg: Config, cert_path: Path, key_path: Path) -> None:
    """Each file written whole and renamed into place, the certificate first: a write cut short
    leaves a generated certificate without its key, which the next start generates again."""
    key = ec.generate_private_key(ec.SECP256R1())
    host = cfg.public_hostname
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, host),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, GENERATED_ORG),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, GENERATED_UNIT),
        ]
    )
    alt: list[x509.GeneralName] = [x509.DNSName(host)]
    for value in (host, *LOOPBACK_NAMES):
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            entry = x509.DNSName(value)
        if entry not in alt:
            alt.append(entry)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=GENERATED_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _replace(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    _replace(key_path, key_pem)


def _replace(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
