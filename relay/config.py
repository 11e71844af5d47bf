"""Typed configuration: frozen dataclasses loaded from TOML (durations and sizes: relay/units.py).

Every key is validated at load; an unknown key is an error that names it. With no file at all the
defaults run unprivileged on loopback (127.0.0.1:2587 STARTTLS and 127.0.0.1:2465 TLS) with state in
``$STATE_DIRECTORY`` (set by systemd) or ``~/.local/state/relaybox``.

Lookup order: ``--config PATH``, ``$RELAYBOX_CONFIG``, ``/etc/relaybox/relaybox.toml`` if it exists,
else the built-in defaults.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.units import Duration, Fraction, Size, format_duration, parse_duration, parse_size

SYSTEM_CONFIG = Path("/etc/relaybox/relaybox.toml")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid. The message names the key."""


def default_state_dir() -> Path:
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        # systemd may pass several, colon-separated; the first is ours.
        return Path(env.split(":")[0])
    return Path.home() / ".local" / "state" / "relaybox"


@dataclass(frozen=True)
class Listener:
    address: str = "127.0.0.1"
    port: int = 2587
    mode: str = "starttls"  # "starttls" (RFC 6409 submission) or "tls" (RFC 8314 implicit TLS)

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, ("starttls", "tls"))
        _check_port("port", self.port, allow_zero=True)
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            if not self.address or not re.match(r"^[A-Za-z0-9.-]+$", self.address):
                raise ValueError(f"{self.address!r} is not an IP address or host name") from None

    @property
    def security(self) -> str:
        """How the connection info page names it."""
        return "STARTTLS" if self.mode == "starttls" else "SSL/TLS"


def _default_listeners() -> tuple[Listener, ...]:
    return (Listener("127.0.0.1", 2587, "starttls"), Listener("127.0.0.1", 2465, "tls"))


@dataclass(frozen=True)
class TLSConfig:
    cert: str = ""  # empty: a self-signed ECDSA certificate is generated into the state dir
    key: str = ""
    min_version: str = "1.2"

    def __post_init__(self) -> None:
        _check_choice("min_version", self.min_version, ("1.2", "1.3"))
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert and key must be set together")


@dataclass(frozen=True)
class Argon2Params:
    time_cost: int = 2
    memory_kib: int = 19456
    parallelism: int = 1

    def __post_init__(self) -> None:
        _check_range("time_cost", self.time_cost, 1, 100)
        _check_range("memory_kib", self.memory_kib, 8, 4 * 1024 * 1024)
        _check_range("parallelism", self.parallelism, 1, 64)


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
        _check_range("max_failures", self.max_failures, 1, 10000)
        if n := self.max_failures_per_address:  # 0 stands for 10 x max_failures
            _check_range("max_failures_per_address", n, self.max_failures, 1_000_000)
        _check_range("ipv6_prefix", self.ipv6_prefix, 32, 128)  # /32: an ISP's whole allocation
        _check_range("min_password_length", self.min_password_length, 8, 1024)
        _check_range("verify_threads", self.verify_threads, 0, 256)


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
        _check_port("port", self.port)
        if not 0.05 <= float(self.timeout) <= 60:  # 0 would make every lookup a temperror
            raise ValueError(f"timeout: {format_duration(self.timeout)} is outside 50ms..60s")
        for ns in self.nameservers:
            _check_ip("nameservers", ns)
        for ip in self.outbound_ips:
            _check_ip("outbound_ips", ip)
        for check in self.required:
            _check_choice("required", check, CHECKS)
        _check_choice("dkim_key_type", self.dkim_key_type, ("rsa", "ed25519"))
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9-]*$", self.dkim_selector):
            raise ValueError("dkim_selector: must be a DNS label")


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
    drain_timeout: Duration = Duration(30)

    def __post_init__(self) -> None:
        _check_range("max_recipients", self.max_recipients, 1, 100000)
        _check_range("max_connections", self.max_connections, 1, 1000000)
        _check_range("max_connections_per_ip", self.max_connections_per_ip, 1, 1000000)
        _check_range("max_idle_commands", self.max_idle_commands, 1, 1000000)
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
        _check_port("port", self.port)
        _check_choice("security", self.security, ("starttls", "tls", "none"))
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
    smarthost: SmarthostConfig = field(default_factory=SmarthostConfig)

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, ("mx", "smarthost"))
        _check_choice("tls", self.tls, ("opportunistic", "required", "none"))
        _check_port("port", self.port)
        _check_range("concurrency", self.concurrency, 1, 10000)
        _check_range("per_destination", self.per_destination, 1, 10000)
        if self.mode == "smarthost" and not self.smarthost.host:
            raise ValueError("smarthost.host: required when mode is smarthost")


@dataclass(frozen=True)
class SpoolConfig:
    retention: Duration = Duration(7 * 86400)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # e.g. "127.0.0.1:9465"; empty: no metrics endpoint

    def __post_init__(self) -> None:
        if self.listen:
            host, sep, port = self.listen.rpartition(":")
            if not sep or not port.isdigit():
                raise ValueError("listen: expected HOST:PORT")
            _check_port("listen", int(port), allow_zero=True)


@dataclass(frozen=True)
class Config:
    state_dir: Path = field(default_factory=default_state_dir)
    public_hostname: str = "localhost"
    listen: tuple[Listener, ...] = field(default_factory=_default_listeners)
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    workers: int = 1
    source: str = field(default="(built-in defaults)", compare=False)

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", self.public_hostname):
            raise ValueError("public_hostname: not a valid host name")
        _check_range("workers", self.workers, 1, 64)
        if self.workers > 1 and any(li.port == 0 for li in self.listen):
            raise ValueError("workers: listeners must name their port to be shared (not port 0)")

    @property
    def db_path(self) -> Path:
        return self.state_dir / "relaybox.db"

    def spool_path(self, worker: int = 0) -> Path:
        return self.state_dir / f"spool-{worker}.db"


SECRET_KEYS = {("delivery", "smarthost", "password")}


# --- loading ------------------------------------------------------------------------------------


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def _check_range(key: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{key}: {value} is outside {lo}..{hi}")


def _check_port(key: str, value: int, allow_zero: bool = False) -> None:
    _check_range(key, value, 0 if allow_zero else 1, 65535)


def _check_ip(key: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{key}: {value!r} is not an IP address") from None


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert a TOML value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    try:
        if tp is Duration:
            return parse_duration(value)
        if tp is Size:
            return parse_size(value)
        if tp is Path:
            if not isinstance(value, str) or not value:
                raise ValueError("expected a path")
            return Path(value).expanduser()
        if tp is bool:
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError("expected an integer")
            return value
        if tp is Fraction:
            return Fraction.parse(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
        if origin is tuple:
            (inner, _ellipsis) = typing.get_args(tp)
            if not isinstance(value, list):
                raise ValueError("expected a list")
            return tuple(_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError("expected a table")
            return _build(tp, value, key)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key}: {exc}") from None
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover


def _build(cls: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            raise ConfigError(f"{key}: unknown key")
        kwargs[name] = _convert(hints[name], value, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:
        msg = str(exc)
        raise ConfigError(f"{prefix}.{msg}" if prefix else msg) from None


def from_dict(data: dict[str, Any], source: str = "(dict)") -> Config:
    cfg: Config = _build(Config, data)
    return dataclasses.replace(cfg, source=source)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load: explicit path, else $RELAYBOX_CONFIG, else the system file, else defaults."""
    if path is None:
        env = os.environ.get("RELAYBOX_CONFIG")
        if env:
            path = env
        elif SYSTEM_CONFIG.exists():
            path = SYSTEM_CONFIG
    if path is None:
        return Config()
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return from_dict(data, source=str(p))


def to_dict(cfg: Config, *, redact: bool = True) -> dict[str, Any]:
    """The effective config as TOML-shaped data (durations and sizes spelled), secrets redacted."""

    def conv(obj: Any, path: tuple[str, ...]) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            out = {}
            for f in dataclasses.fields(obj):
                if f.name == "source":
                    continue
                v = getattr(obj, f.name)
                sub = (*path, f.name)
                if redact and sub in SECRET_KEYS and v:
                    out[f.name] = "********"
                else:
                    out[f.name] = conv(v, sub)
            return out
        if isinstance(obj, Duration):
            return format_duration(obj)
        if isinstance(obj, Size):
            return int(obj)
        if isinstance(obj, Path):
            return str(obj)
        if isinstance(obj, tuple):
            return [conv(v, path) for v in obj]
        return obj

    result: dict[str, Any] = conv(cfg, ())
    return result
