"""The doctor's checks: tell the operator what is wrong before their users do.

Checks, in order: the install (handed in by the caller), the config (and whether a file holding
the smarthost password is readable by others: relay/service/access.py), the TLS certificate
(readable, key matches, expiry, names, readable by the service user), the state dir (mode, owner,
files the service could not use, free space), the store (users, and those expiring within 7 days
or expired; domains), each domain's DNS
records (looked up now, never recorded: the domain's state changes only through `domain verify`
and the server's schedule), that every listener answers (220 greeting; TLS or STARTTLS handshake;
the certificate it serves is the one on disk), the metrics endpoint, and optionally a real
submission through the running relay.

Each check decides pass, warn or fail and says why; `admin/doctor_cmd.py` only prints them. The
client that talks to the listeners is :mod:`relay.service.probe`.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import pwd
import shutil
import ssl
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import aiosmtplib
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from relay import dnscheck, userrules
from relay.config import Config, ConfigError, Listener
from relay.metrics import parse_listen
from relay.service import probe, tlsutil
from relay.service.access import config_secret, readable_by, service_user, stray_files
from relay.store import domains, users
from relay.store.engine import Store

EXPIRY_WARN_DAYS = 14  # Let's Encrypt renews at 30 days left: below 14, renewal is failing
USER_EXPIRY_WARN_DAYS = 7  # a user's expiry (`user set --expires`) this close is warned about
MIN_FREE_BYTES = 1024**3
ORDER = {"fail": 0, "warn": 1, "pass": 2}


@dataclass(frozen=True)
class Check:
    check: str
    status: str  # "pass" | "warn" | "fail"
    detail: str


@dataclass(frozen=True)
class SendTest:
    """What ``--send-test`` submits: from ``login`` (with its password) to ``to``."""

    login: str
    password: str = field(repr=False)
    to: str


OpenDatabase = Callable[[Config], AbstractAsyncContextManager[Store]]


def _worst(*statuses: str) -> str:
    return min(statuses, key=ORDER.__getitem__)


# --- config, TLS, state dir ---------------------------------------------------------------------


def check_config(cfg: Config) -> list[Check]:
    if cfg.source.startswith("("):
        return [Check("config", "warn", "no config file: built-in defaults (loopback only)")]
    out = [Check("config", "pass", f"loaded {cfg.source}")]
    if cfg.public_hostname in ("localhost", "localhost.localdomain"):
        out.append(Check("public_hostname", "warn", "is localhost: set the name clients use"))
    secret = config_secret(cfg)
    if secret is not None:
        out.append(Check("config secret", "warn" if secret.exposed else "pass", secret.detail))
    return out


def check_tls(cfg: Config, now: datetime.datetime) -> list[Check]:
    cert_path, key_path = tlsutil.cert_paths(cfg)
    generated = not cfg.tls.cert
    if generated and not cert_path.exists():
        return [Check("tls", "warn", "no certificate: a self-signed one is made on first start")]
    try:
        tlsutil.loaded(cfg)  # what a start or a reload does: the message names the file
        cert = tlsutil.certificate_info(cfg)
    except ConfigError as exc:
        return [Check("tls", "fail", str(exc))]
    except (OSError, ValueError) as exc:  # replaced between the two reads
        return [Check("tls", "fail", f"{cert_path}: {exc}")]
    out = []
    left = cert.not_valid_after_utc - now
    expiry = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    if cert.not_valid_before_utc > now:
        out.append(Check("tls expiry", "fail", f"not valid before {cert.not_valid_before_utc}"))
    elif left.total_seconds() <= 0:
        out.append(Check("tls expiry", "fail", f"expired on {expiry}"))
    elif left.days < EXPIRY_WARN_DAYS:
        out.append(Check("tls expiry", "warn", f"expires in {left.days} days ({expiry}): renew"))
    else:
        out.append(Check("tls expiry", "pass", f"expires in {left.days} days ({expiry})"))
    names = cert_names(cert)
    if any(name_matches(n, cfg.public_hostname) for n in names):
        out.append(Check("tls names", "pass", f"{cfg.public_hostname} in {', '.join(names)}"))
    else:
        shown = ", ".join(names) or "no DNS names"
        out.append(Check("tls names", "fail", f"{cfg.public_hostname} not in ({shown})"))
    if generated:
        out.append(Check("tls issuer", "warn", "self-signed (generated): clients will not trust"))
    user = service_user(cfg)
    if user is not None and os.geteuid() == 0:
        blocked = [str(p) for p in (cert_path, key_path) if not readable_by(p, user)]
        if blocked:
            out.append(
                Check(
                    "tls access",
                    "fail",
                    f"{user.pw_name} cannot read {', '.join(blocked)}: copy them into /etc/relaybox"
                    " with a renewal deploy hook (README)",
                )
            )
    return out


def cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


def name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 6.4.3: a wildcard stands for exactly one leftmost label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def check_state_dir(cfg: Config) -> list[Check]:
    d = cfg.state_dir
    try:
        st = d.stat()
    except FileNotFoundError:
        return [Check("state dir", "warn", f"{d} does not exist yet (made on first start)")]
    except OSError as exc:
        return [Check("state dir", "fail", f"{d}: {exc.strerror}")]
    mode = st.st_mode & 0o777
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = f"uid {st.st_uid}"
    status, notes = "pass", [f"{d} mode {mode:04o} owner {owner}"]
    if mode & 0o077:
        status, notes = "warn", [*notes, "should be 0700 (it holds keys and mail)"]
    relaybox = service_user(cfg)
    if st.st_uid == 0 and relaybox is not None:
        status, notes = "warn", [*notes, f"owned by root, the service runs as {relaybox.pw_name}"]
    out = [Check("state dir", status, "; ".join(notes))]
    strays = stray_files(d)
    if strays:
        shown = ", ".join(p.name for p in strays[:5]) + (" ..." if len(strays) > 5 else "")
        out.append(
            Check("state files", "fail", f"not owned by {owner}: {shown} (chown -R {owner} {d})")
        )
    free = shutil.disk_usage(d).free
    out.append(
        Check(
            "disk space",
            "warn" if free < MIN_FREE_BYTES else "pass",
            f"{free / 1024**3:.1f} GiB free under {d}",
        )
    )
    return out


# --- store and DNS ------------------------------------------------------------------------------


async def check_store(cfg: Config, open_db: OpenDatabase, now: float | None = None) -> list[Check]:
    if not cfg.store.url and not cfg.db_path.exists():
        return [Check("database", "warn", f"{cfg.db_path} not created yet (first start does)")]
    async with open_db(cfg) as db:
        all_users = await users.list_all(db)
        all_domains = await domains.list_all(db)
        resolver = dnscheck.make_resolver(cfg)
        limit = asyncio.Semaphore(8)

        async def one(d: domains.Domain) -> Check:
            if d.sandbox:  # nothing is published for it, and nothing is looked up
                return Check(f"domain {d.name}", "pass", _SANDBOX)
            async with limit:
                results = await domains.check_records(resolver, d, cfg)
            return domain_check(d, results, cfg)

        domain_checks = await asyncio.gather(*(one(d) for d in all_domains))
    out = [
        Check(
            "users",
            "pass" if all_users else "warn",
            f"{len(all_users)} user(s)" if all_users else "none yet: relaybox user add LOGIN",
        )
    ]
    out += check_user_expiry(all_users, time.time() if now is None else now)
    if not all_domains:
        out.append(Check("domains", "warn", "none yet: relaybox domain add DOMAIN"))
    return out + list(domain_checks)


def check_user_expiry(all_users: list[users.User], now: float) -> list[Check]:
    """A warning naming the users whose passwords stop working within 7 days, another for those
    already expired (refused like a wrong password; a disabled user is left out: it is refused
    anyway). Nothing when no user has an expiry."""
    dated = [(u.login, u.expires_at) for u in all_users if u.expires_at and not u.disabled]
    if not dated:
        return []
    horizon = now + USER_EXPIRY_WARN_DAYS * userrules.DAY
    soon = [f"{login} ({userrules.format_time(at)})" for login, at in dated if now < at <= horizon]
    gone = [f"{login} (since {userrules.format_time(at)})" for login, at in dated if now >= at]
    within = f"within {USER_EXPIRY_WARN_DAYS} days"
    fix = "`relaybox user set LOGIN --expires 90d`"
    out = [
        Check("users expiring", "warn", f"{within}: {', '.join(soon)}; extend with {fix}")
        if soon
        else Check("users expiring", "pass", f"none {within}")
    ]
    if gone:
        out.append(Check("users expired", "warn", f"{', '.join(gone)}: passwords refused"))
    return out


_SANDBOX = "sandbox: verified without DNS; its mail is kept in `relaybox inbox`, never sent out"


def domain_check(d: domains.Domain, results: list[dnscheck.CheckResult], cfg: Config) -> Check:
    status, notes = "pass", []
    for r in results:
        required = r.check in cfg.dns.required
        if r.result == "pass":
            continue
        if r.result == "fail":
            status = _worst(status, "fail" if required else "warn")
        else:
            status = _worst(status, "warn")
        notes.append(f"{r.check} {r.result}" + (f" ({r.reason})" if r.reason else ""))
    passed = [r.check for r in results if r.result == "pass"]
    if d.state == "suspended":
        status = "fail"
        notes.insert(0, "suspended: not sending")
    elif d.state == "failing":
        status = "fail"
        notes.insert(0, "failing: suspended once dns.failure_grace passes")
    elif d.state == "pending":
        status = _worst(status, "warn")
        notes.insert(0, "pending: relaybox domain verify " + d.name)
    detail = "; ".join(notes) if notes else f"{d.state}; " + " ".join(f"{c} pass" for c in passed)
    return Check(f"domain {d.name}", status, detail)


# --- listeners, metrics, send test --------------------------------------------------------------


async def check_listener(listener: Listener, cfg: Config, on_disk: bytes | None) -> Check:
    host = probe.connect_host(listener.address)
    name = f"listen {host}:{listener.port} {listener.mode}"
    if listener.port == 0:
        return Check(name, "warn", "port 0 (ephemeral): cannot probe")
    tls = listener.mode == "tls"
    try:
        async with (
            asyncio.timeout(probe.PROBE_TIMEOUT),
            probe.connect(
                host, listener.port, tls_hostname=cfg.public_hostname if tls else None
            ) as conn,
        ):
            greeting = await conn.reply()
            if not greeting.startswith("220"):
                return Check(name, "fail", f"greeting: {greeting[:80]}")
            if not tls:
                ehlo = await conn.command(f"EHLO {probe.EHLO_NAME}")
                if "STARTTLS" not in ehlo.upper():
                    return Check(name, "fail", "STARTTLS not offered")
                if not (await conn.command("STARTTLS")).startswith("220"):
                    return Check(name, "fail", "STARTTLS refused")
                await conn.start_tls(cfg.public_hostname)
            served = conn.peer_certificate()
            conn.send(b"QUIT\r\n")
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        return Check(name, "fail", f"not answering ({why}): is the service running?")
    if on_disk is not None and served is not None and served != on_disk:
        return Check(name, "warn", "serves an older certificate: systemctl reload relaybox")
    return Check(name, "pass", f"{greeting.splitlines()[0][:60]}; TLS ok")


async def check_metrics(cfg: Config) -> list[Check]:
    if not cfg.metrics.listen:
        return []
    host, port = parse_listen(cfg.metrics.listen)
    try:
        async with (
            asyncio.timeout(probe.PROBE_TIMEOUT),
            probe.connect(probe.connect_host(host or ""), port, tls_hostname=None) as conn,
        ):
            conn.send(b"GET /metrics HTTP/1.0\r\n\r\n")
            status = await conn.line()
    except (OSError, TimeoutError) as exc:
        return [Check("metrics", "fail", f"{cfg.metrics.listen} not answering: {exc}")]
    ok = status.endswith("200 OK")
    return [Check("metrics", "pass" if ok else "fail", f"{cfg.metrics.listen}: {status}")]


async def send_test(cfg: Config, send: SendTest) -> Check:
    listener = next((li for li in cfg.listen if li.mode == "tls"), cfg.listen[0])
    try:
        reply = await probe.submit(
            listener, cfg.public_hostname, send.login, send.password, send.to
        )
    except aiosmtplib.SMTPException as exc:
        return Check("send test", "fail", f"to {send.to}: {exc}")
    except OSError as exc:
        return Check("send test", "fail", f"cannot connect: {exc}")
    return Check("send test", "pass", f"to {send.to}: {reply}")


# --- all of them --------------------------------------------------------------------------------


def certificate_on_disk(cfg: Config) -> bytes | None:
    """The file's first certificate as DER (what a listener should serve; a full-chain file's
    others are its chain), or None if unreadable."""
    try:
        return tlsutil.certificate_info(cfg).public_bytes(Encoding.DER)
    except (OSError, ValueError):
        return None


async def run_checks(
    cfg: Config, *, install: Check, open_db: OpenDatabase, send: SendTest | None = None
) -> list[Check]:
    """Every check, in order. ``install`` is the caller's verdict on the installed dependencies;
    ``open_db`` opens the shared database (the caller decides as whom)."""
    now = datetime.datetime.now(datetime.UTC)
    out = [install, *check_config(cfg), *check_tls(cfg, now), *check_state_dir(cfg)]
    on_disk = certificate_on_disk(cfg)
    # The store last among the local checks: the caller's open_db may switch to the service user.
    out += await check_store(cfg, open_db, now.timestamp())
    out += await asyncio.gather(*(check_listener(li, cfg, on_disk) for li in cfg.listen))
    out += await check_metrics(cfg)
    if send is not None:
        out.append(await send_test(cfg, send))
    return out
