"""The config file's sections (``[tls]``, ``[auth]``, ``[dns]``, ``[limits]``, ``[delivery]``,
``[spool]``, ``[sandbox]``, ``[suppression]``, ``[webhooks]``, ``[metrics]``, ``[store]``): one
frozen dataclass each, validating its own keys at load.

Split from relay/config.py, which keeps the top-level keys (``state_dir``, ``public_hostname``,
``[[listen]]``, ``workers``), the :class:`relay.config.Config` tree and the TOML loader. Durations
and sizes are relay/units.py's. A validation error is a ``ValueError`` whose text starts with the
key; the loader prefixes the section.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from relay.units import Duration, Fraction, Size, format_duration


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def check_range(key: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{key}: {value} is outside {lo}..{hi}")


def check_port(key: str, value: int, allow_zero: bool = False) -> None:
    check_range(key, value, 0 if allow_zero else 1, 65535)


def check_ip(key: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{key}: {value!r} is not an IP address") from None


@dataclass(frozen=True)
class TLSConfig:
    cert: str = ""  # empty: a self-signed ECDSA certificate is generated into the state dir
    key: str = ""
    min_version: str = "1.2"

    def __post_init__(self) -> None:
        check_choice("min_version", self.min_version, ("1.2", "1.3"))
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert and key must be set together")


@dataclass(frozen=True)
class Argon2Params:
    time_cost: int = 2
    memory_kib: int = 19456
    parallelism: int = 1

    def __post_init__(self) -> None:
        check_range("time_cost", self.time_cost, 1, 100)
        check_range("memory_kib", self.memory_kib, 8, 4 * 1024 * 1024)
        check_range("parallelism", self.parallelism, 1, 64)


@dataclass(frozen=True)
class AuthConfig:
    reset_grace: Duration = Duration(3600)
    cache_ttl: Duration = Duration(300)
    allow_plaintext: bool = False
    max_failures: int = 5  # per (client address, login)
    max_failures_per_address: int = 0  # per client address, any login; 0: 10 x max_failures
    ipv6_prefix: int = 64  # an IPv6 client address counts as its network of this many bits
    failure_window: Duration = Duration(900)
    lockout: Duration = Duration(900)
    min_password_length: int = 12
    verify_threads: int = 0  # 0: one per CPU core
    failure_delay: Duration = Duration(0.5)  # every failed AUTH pays at least this long
    argon2: Argon2Params = field(default_factory=Argon2Params)

    def __post_init__(self) -> None:
        check_range("max_failures", self.max_failures, 1, 10000)
        if n := self.max_failures_per_address:  # 0 stands for 10 x max_failures
            check_range("max_failures_per_address", n, self.max_failures, 1_000_000)
        check_range("ipv6_prefix", self.ipv6_prefix, 32, 128)  # /32: an ISP's whole allocation
        check_range("min_password_length", self.min_password_length, 8, 1024)
        check_range("verify_threads", self.verify_threads, 0, 256)


CHECKS = ("ownership", "spf", "dkim", "dmarc")


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: Duration = Duration(2)
    required: tuple[str, ...] = ("ownership", "spf", "dkim")
    recheck_interval: Duration = Duration(3600)
    failure_grace: Duration = Duration(86400)
    spf_include: str = ""
    outbound_ips: tuple[str, ...] = ()
    dkim_selector: str = "relaybox"
    dkim_key_type: str = "rsa"  # "rsa" (2048-bit) or "ed25519"

    def __post_init__(self) -> None:
        check_port("port", self.port)
        if not 0.05 <= float(self.timeout) <= 60:  # 0 would make every lookup a temperror
            raise ValueError(f"timeout: {format_duration(self.timeout)} is outside 50ms..60s")
        for ns in self.nameservers:
            check_ip("nameservers", ns)
        for ip in self.outbound_ips:
            check_ip("outbound_ips", ip)
        for check in self.required:
            check_choice("required", check, CHECKS)
        check_choice("dkim_key_type", self.dkim_key_type, ("rsa", "ed25519"))
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9-]*$", self.dkim_selector):
            raise ValueError("dkim_selector: must be a DNS label")


@dataclass(frozen=True)
class UserLimitsConfig:
    """``[limits.user]``: what every SMTP user may send unless `relaybox user set` says otherwise
    (0 = unlimited). Fixed UTC windows: the clock hour, the UTC day (relay/userrules.py)."""

    messages_per_hour: int = 1000
    messages_per_day: int = 10000
    recipients_per_day: int = 20000

    def __post_init__(self) -> None:
        for name in ("messages_per_hour", "messages_per_day", "recipients_per_day"):
            check_range(name, getattr(self, name), 0, 1_000_000_000)


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: Size = Size(25 * 1024 * 1024)
    max_recipients: int = 100
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    idle_timeout: Duration = Duration(300)
    tls_handshake_timeout: Duration = Duration(10)  # connections count from accept, TLS or not
    max_idle_commands: int = 100  # commands that bring no message closer, between two messages
    data_timeout: Duration = Duration(600)
    data_memory_budget: Size = Size(1024 * 1024 * 1024)  # messages in DATA at once, ~6x size each
    data_memory_share_per_user: Fraction = Fraction(0.25)  # of the budget, per user and address
    data_memory_share_per_ip: Fraction = Fraction(0.25)
    # large bodies on disk while DATA reads them (relay/smtp/spill.py); the same shares apply
    data_disk_budget: Size = Size(4 * 1024 * 1024 * 1024)
    drain_timeout: Duration = Duration(30)
    bare_newline: str = "normalize"  # a bare LF in DATA: a line end (Postfix 3.9), or "reject"
    user: UserLimitsConfig = field(default_factory=UserLimitsConfig)  # [limits.user]

    def __post_init__(self) -> None:
        check_choice("bare_newline", self.bare_newline, ("normalize", "reject"))
        check_range("max_recipients", self.max_recipients, 1, 100000)
        check_range("max_connections", self.max_connections, 1, 1000000)
        check_range("max_connections_per_ip", self.max_connections_per_ip, 1, 1000000)
        check_range("max_idle_commands", self.max_idle_commands, 1, 1000000)
        if not 0.1 <= float(self.tls_handshake_timeout) <= 300:
            raise ValueError("tls_handshake_timeout: must be within 100ms..5m")
        if self.max_message_size < 1024:
            raise ValueError("max_message_size: must be at least 1KiB")


@dataclass(frozen=True)
class SmarthostConfig:
    host: str = ""
    port: int = 587
    security: str = "starttls"  # "starttls", "tls" or "none"
    username: str = ""
    password: str = ""  # secret: redacted by `config show`
    allow_plaintext_auth: bool = False  # security "none" with a username: the password in clear

    def __post_init__(self) -> None:
        check_port("port", self.port)
        check_choice("security", self.security, ("starttls", "tls", "none"))
        if self.security == "none" and self.username and not self.allow_plaintext_auth:
            why = 'security "none" would send the password in clear: use starttls or tls'
            raise ValueError(f"allow_plaintext_auth: {why}, or set this to true")


@dataclass(frozen=True)
class DeliveryConfig:
    mode: str = "mx"  # "mx" or "smarthost"
    port: int = 25
    tls: str = "opportunistic"  # "opportunistic", "required" or "none"
    max_age: Duration = Duration(5 * 86400)
    concurrency: int = 50
    per_destination: int = 5
    connect_timeout: Duration = Duration(30)
    command_timeout: Duration = Duration(300)
    paused: bool = False  # accept and queue, but do not deliver (maintenance, benchmarks)
    memory_budget: Size = Size(512 * 1024 * 1024)  # large bodies in flight (~3x each), all workers
    smarthost: SmarthostConfig = field(default_factory=SmarthostConfig)

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("mx", "smarthost"))
        check_choice("tls", self.tls, ("opportunistic", "required", "none"))
        check_port("port", self.port)
        check_range("concurrency", self.concurrency, 1, 10000)
        check_range("per_destination", self.per_destination, 1, 10000)
        if self.mode == "smarthost" and not self.smarthost.host:
            raise ValueError("smarthost.host: required when mode is smarthost")


@dataclass(frozen=True)
class SpoolConfig:
    retention: Duration = Duration(7 * 86400)


@dataclass(frozen=True)
class SandboxConfig:
    inbox_max_messages: int = 1000  # captured messages kept; the oldest are dropped first

    def __post_init__(self) -> None:
        check_range("inbox_max_messages", self.inbox_max_messages, 1, 1_000_000)


_SUPPRESSION_CODE = re.compile(r"^5\.(\d{1,3}|\*)\.(\d{1,3}|\*)$")


@dataclass(frozen=True)
class SuppressionConfig:
    """``[suppression]``: which permanent failures put a recipient on its sender domain's
    suppression list (enhanced codes, "*" for any number), and for how long (0: for good)."""

    codes: tuple[str, ...] = ("5.1.*", "5.2.1")
    ttl: Duration = Duration(0)

    def __post_init__(self) -> None:
        for code in self.codes:
            if not _SUPPRESSION_CODE.match(code):
                raise ValueError(
                    f"codes: {code!r} is not a permanent enhanced code such as 5.1.1 or 5.1.*"
                )


@dataclass(frozen=True)
class WebhooksConfig:
    """``[webhooks]``: how delivery events are posted (relay/delivery/poster.py). A failed post
    is tried again after ``backoff``, doubling each time (at most 6h apart), until ``max_age``
    after the event; then it is listed as failed (``relaybox webhook deliveries --failed``)."""

    timeout: Duration = Duration(10)  # one post, connect to the last byte read
    backoff: Duration = Duration(30)  # the first retry's delay
    max_age: Duration = Duration(86400)
    concurrency: int = 4  # posts in flight per endpoint (per worker)
    refresh_interval: Duration = Duration(30)  # endpoints re-read (and at SIGHUP)

    def __post_init__(self) -> None:
        if not 0 < float(self.timeout) <= 300:
            raise ValueError("timeout: expected more than 0 s and at most 5m")
        if not 0 < float(self.backoff) <= float(self.max_age):
            raise ValueError("backoff: expected more than 0 s and at most max_age")
        check_range("concurrency", self.concurrency, 1, 1000)
        if float(self.refresh_interval) <= 0:
            raise ValueError("refresh_interval: expected more than 0 s")


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # e.g. "127.0.0.1:9465"; empty: no metrics endpoint

    def __post_init__(self) -> None:
        if self.listen:
            host, sep, port = self.listen.rpartition(":")
            if not sep or not port.isdigit():
                raise ValueError("listen: expected HOST:PORT")
            check_port("listen", int(port), allow_zero=True)


STORE_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: where the shared state lives (relay/store/engine.py). ``url`` empty: the
    embedded SQLite files in the state dir. ``url = "postgresql://relaybox@db.internal/relaybox"``:
    one PostgreSQL database that every node shares. Its password is read from ``password_file``
    (a file holding only the password), else where libpq looks (``PGPASSWORD``, ``~/.pgpass``);
    never from the url, which status output shows. TLS to the database: ``sslmode`` and
    ``sslrootcert`` as libpq means them (``verify-full`` with the database's CA in production;
    ``sslrootcert = "system"`` for the system's CAs)."""

    url: str = ""
    password_file: str = ""
    sslmode: str = "prefer"
    sslrootcert: str = ""
    pool_size: int = 4  # connections per pool (two per process: main tables, counts)
    connect_timeout: Duration = Duration(5)

    def __post_init__(self) -> None:
        if self.url:
            scheme, sep, rest = self.url.partition("://")
            if scheme not in ("postgresql", "postgres") or not sep:
                raise ValueError("url: expected postgresql://USER@HOST[:PORT]/DATABASE (or empty)")
            netloc = rest.split("/", 1)[0]
            if ":" in netloc.rpartition("@")[0]:
                raise ValueError("url: holds a password; put it in password_file instead")
        check_choice("sslmode", self.sslmode, STORE_SSLMODES)
        check_range("pool_size", self.pool_size, 1, 100)
        if not 0 < float(self.connect_timeout) <= 300:
            raise ValueError("connect_timeout: expected more than 0 s and at most 5m")

    @property
    def engine(self) -> str:
        return "postgresql" if self.url else "sqlite"
