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

from relay.config_sections import (
    AuthConfig,
    DeliveryConfig,
    DNSConfig,
    LimitsConfig,
    MetricsConfig,
    SandboxConfig,
    SpoolConfig,
    StoreConfig,
    SuppressionConfig,
    TLSConfig,
    WebhooksConfig,
    check_choice,
    check_port,
    check_range,
)
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
    # PROXY protocol v1/v2 from these balancers only (relay/service/proxyproto.py)
    proxy_protocol: bool = False
    trusted_proxies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("starttls", "tls"))
        for net in self.trusted_proxies:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {net!r} is not an address or network") from None
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError(
                "trusted_proxies: proxy_protocol = true needs the balancers' addresses (CIDRs):"
                " a header from anyone else is refused"
            )
        check_port("port", self.port, allow_zero=True)
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
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    workers: int = 1
    dkim_signing: str = "auto"  # where RSA private-key steps run: "auto", "process", "inline"
    source: str = field(default="(built-in defaults)", compare=False)

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", self.public_hostname):
            raise ValueError("public_hostname: not a valid host name")
        check_range("workers", self.workers, 1, 64)
        check_choice("dkim_signing", self.dkim_signing, ("auto", "process", "inline"))
        if self.workers > 1 and any(li.port == 0 for li in self.listen):
            raise ValueError("workers: listeners must name their port to be shared (not port 0)")

    @property
    def db_path(self) -> Path:
        return self.state_dir / "relaybox.db"

    def spool_path(self, worker: int = 0) -> Path:
        return self.state_dir / f"spool-{worker}.db"

    @property
    def usage_path(self) -> Path:
        """Per-user sending counts and usage (relay/store/usage.py), shared by every worker."""
        return self.state_dir / "usage.db"

    @property
    def inbox_path(self) -> Path:
        """The sandbox domains' captured mail (relay/store/inbox.py), shared by every worker."""
        return self.state_dir / "inbox.db"


SECRET_KEYS = {("delivery", "smarthost", "password")}


# --- loading ------------------------------------------------------------------------------------


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
