"""`relaybox doctor`: tell the operator what is wrong before their users do.

Checks, in order: the config, the TLS certificate (readable, key matches, expiry, names, readable
by the service user), the state dir (mode, owner, files the service could not use, free space),
the store (users, domains), each domain's DNS records (looked up now, never recorded: the domain's
state changes only through `domain verify` and the server's schedule), that every listener answers
(220 greeting; TLS or STARTTLS handshake; the certificate it serves is the one on disk), the metrics
endpoint, and with ``--send-test`` a real submission through the running relay.

The SMTP exchanges here are a diagnostic client talking to our own listeners, not delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import pwd
import shutil
import ssl
import time
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import click
from cryptography import x509

from admin import common, lockinfo
from relay import dnscheck
from relay.config import Config, Listener
from relay.metrics import parse_listen
from relay.service import tlsutil
from relay.store import domains, users

EXPIRY_WARN_DAYS = 14  # Let's Encrypt renews at 30 days left: below 14, renewal is failing
MIN_FREE_BYTES = 1024**3
PROBE_TIMEOUT = 5.0
ORDER = {"fail": 0, "warn": 1, "pass": 2}


@dataclass(frozen=True)
class Check:
    check: str
    status: str  # "pass" | "warn" | "fail"
    detail: str


def _worst(*statuses: str) -> str:
    return min(statuses, key=ORDER.__getitem__)


# --- config, TLS, state dir ---------------------------------------------------------------------


def check_config(cfg: Config) -> list[Check]:
    if cfg.source.startswith("("):
        return [Check("config", "warn", "no config file: built-in defaults (loopback only)")]
    out = [Check("config", "pass", f"loaded {cfg.source}")]
    if cfg.public_hostname in ("localhost", "localhost.localdomain"):
        out.append(Check("public_hostname", "warn", "is localhost: set the name clients use"))
    return out


def check_install() -> Check:
    """Whether the dependencies are the locked set they were installed from."""
    rec = lockinfo.recorded()
    status = "pass" if rec is not None and not rec.drift else "warn"
    return Check("install", status, lockinfo.describe(rec).removeprefix("dependencies: "))


def service_user(cfg: Config) -> pwd.struct_passwd | None:
    """Who the service runs as: the state dir's owner if not root, else a `relaybox` user."""
    try:
        owner = cfg.state_dir.stat().st_uid
        if owner != 0:
            return pwd.getpwuid(owner)
    except (OSError, KeyError):
        pass
    try:
        return pwd.getpwnam("relaybox")
    except KeyError:
        return None


def readable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """POSIX permission bits only (ACLs are not consulted): every directory on the way, the
    symlink targets' too (Let's Encrypt's live/ links into archive/), must let ``user`` through."""
    gids = set(os.getgrouplist(user.pw_name, user.pw_gid))

    def allowed(p: Path, bit: int) -> bool:
        st = p.stat()
        if st.st_uid == user.pw_uid:
            return bool(st.st_mode & (bit << 6))
        if st.st_gid in gids:
            return bool(st.st_mode & (bit << 3))
        return bool(st.st_mode & bit)

    try:
        for candidate in {path.absolute(), path.resolve()}:
            if not all(allowed(d, 1) for d in candidate.parents):
                return False
        return allowed(path.resolve(), 4)
    except OSError:
        return False


def check_tls(cfg: Config, now: datetime.datetime) -> list[Check]:
    cert_path, key_path = tlsutil.cert_paths(cfg)
    generated = not cfg.tls.cert
    if generated and not cert_path.exists():
        return [Check("tls", "warn", "no certificate: a self-signed one is made on first start")]
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert_path), str(key_path))
    except OSError as exc:
        return [Check("tls", "fail", f"cannot read {exc.filename or cert_path}: {exc.strerror}")]
    except (ValueError, ssl.SSLError) as exc:
        return [Check("tls", "fail", f"{cert_path} / {key_path} unusable: {exc}")]
    cert = certs[0]
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


def stray_files(state_dir: Path) -> list[Path]:
    """Files in the state dir that its owner (the service) does not own: it may not open them."""
    owner = state_dir.stat().st_uid
    return [p for p in sorted(state_dir.rglob("*")) if p.lstat().st_uid != owner]


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


async def check_store(cfg: Config) -> list[Check]:
    if not cfg.db_path.exists():
        return [Check("database", "warn", f"{cfg.db_path} not created yet (first start does)")]
    async with common.main_db(cfg) as db:
        all_users = await users.list_all(db)
        all_domains = await domains.list_all(db)
        resolver = dnscheck.make_resolver(cfg)
        limit = asyncio.Semaphore(8)

        async def one(d: domains.Domain) -> Check:
            async with limit:
                results = await dnscheck.run_checks(resolver, d, cfg)
            return domain_check(d, results, cfg)

        domain_checks = await asyncio.gather(*(one(d) for d in all_domains))
    out = [
        Check(
            "users",
            "pass" if all_users else "warn",
            f"{len(all_users)} user(s)" if all_users else "none yet: relaybox user add LOGIN",
        )
    ]
    if not all_domains:
        out.append(Check("domains", "warn", "none yet: relaybox domain add DOMAIN"))
    return out + list(domain_checks)


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


def connect_host(address: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address, address)  # noqa: S104


def _probe_context() -> ssl.SSLContext:
    # The certificate itself is judged by check_tls; here only "does it answer, and with what".
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _reply(reader: asyncio.StreamReader) -> str:
    lines = []
    while True:
        line = (await reader.readline()).decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            raise ConnectionError("connection closed")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return "\n".join(lines)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close and wait for it: a transport left half-closed when the loop ends leaks its socket."""
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


async def probe(listener: Listener, cfg: Config, on_disk: bytes | None) -> Check:
    host = connect_host(listener.address)
    name = f"listen {host}:{listener.port} {listener.mode}"
    if listener.port == 0:
        return Check(name, "warn", "port 0 (ephemeral): cannot probe")
    tls = listener.mode == "tls"
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                host, listener.port, ssl=_probe_context() if tls else None,
                server_hostname=cfg.public_hostname if tls else None,
            )  # fmt: skip
            try:
                greeting = await _reply(reader)
                if not greeting.startswith("220"):
                    return Check(name, "fail", f"greeting: {greeting[:80]}")
                if not tls:
                    writer.write(b"EHLO doctor.invalid\r\n")
                    ehlo = await _reply(reader)
                    if "STARTTLS" not in ehlo.upper():
                        return Check(name, "fail", "STARTTLS not offered")
                    writer.write(b"STARTTLS\r\n")
                    if not (await _reply(reader)).startswith("220"):
                        return Check(name, "fail", "STARTTLS refused")
                    await writer.start_tls(_probe_context(), server_hostname=cfg.public_hostname)
                ssl_obj = writer.get_extra_info("ssl_object")
                served = ssl_obj.getpeercert(binary_form=True) if ssl_obj else None
                writer.write(b"QUIT\r\n")
            finally:
                await _close(writer)
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
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(connect_host(host or ""), port)
            writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
            status = (await reader.readline()).decode("latin-1").strip()
            await _close(writer)
    except (OSError, TimeoutError) as exc:
        return [Check("metrics", "fail", f"{cfg.metrics.listen} not answering: {exc}")]
    ok = status.endswith("200 OK")
    return [Check("metrics", "pass" if ok else "fail", f"{cfg.metrics.listen}: {status}")]


async def send_test(cfg: Config, login: str, password: str, to: str) -> Check:
    import aiosmtplib  # only for --send-test

    listener = next((li for li in cfg.listen if li.mode == "tls"), cfg.listen[0])
    msg = EmailMessage()
    msg["From"] = login
    msg["To"] = to
    msg["Subject"] = "relaybox doctor test"
    msg["Date"] = format_datetime(datetime.datetime.now(datetime.UTC))
    msg["Message-ID"] = make_msgid(domain=cfg.public_hostname)
    msg.set_content(f"A test message sent by `relaybox doctor --send-test` on {time.ctime()}.\n")
    try:
        _, reply = await aiosmtplib.send(
            msg, sender=login, recipients=[to],
            hostname=connect_host(listener.address), port=listener.port,
            username=login, password=password, local_hostname="doctor.invalid",
            use_tls=listener.mode == "tls", start_tls=listener.mode == "starttls",
            tls_context=_probe_context(), timeout=30,
        )  # fmt: skip
    except aiosmtplib.SMTPException as exc:
        return Check("send test", "fail", f"to {to}: {exc}")
    except OSError as exc:
        return Check("send test", "fail", f"cannot connect: {exc}")
    finally:
        # aiosmtplib's close cannot be awaited: give its TLS shutdown a moment to finish before
        # asyncio.run() ends the loop (a half-closed transport leaks its socket).
        await asyncio.sleep(0.05)
    return Check("send test", "pass", f"to {to}: {reply}")


# --- the command --------------------------------------------------------------------------------


async def run_checks(cfg: Config, send: tuple[str, str, str] | None = None) -> list[Check]:
    now = datetime.datetime.now(datetime.UTC)
    out = [check_install(), *check_config(cfg), *check_tls(cfg, now), *check_state_dir(cfg)]
    cert_path, _ = tlsutil.cert_paths(cfg)
    try:
        on_disk: bytes | None = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    except (OSError, ValueError):
        on_disk = None
    # The store last among the local checks: as root it switches to the service user.
    out += await check_store(cfg)
    out += await asyncio.gather(*(probe(li, cfg, on_disk) for li in cfg.listen))
    out += await check_metrics(cfg)
    if send is not None:
        out.append(await send_test(cfg, *send))
    return out


def _test_password() -> str:
    env = os.environ.get("RELAYBOX_TEST_PASSWORD")
    if env:
        return env
    return common.read_secret("Password")


def register(cli: click.Group) -> None:
    @cli.command("doctor")
    @click.option("--send-test", "send_to", metavar="ADDRESS", help="Send a real test message.")
    @click.option("--user", "login", metavar="LOGIN", help="SMTP user for --send-test.")
    @common.json_option
    @click.pass_context
    @common.user_errors
    def doctor(ctx: click.Context, send_to: str | None, login: str | None, json_: bool) -> None:
        """Check config, TLS, state dir, domains' DNS and the listeners; exit 1 on any failure.

        With --send-test ADDRESS --user LOGIN, also submit a real message through the running
        relay; the password comes from $RELAYBOX_TEST_PASSWORD or standard input.
        """
        cfg = common.get_config(ctx)
        send = None
        if send_to:
            if not login:
                raise click.UsageError("--send-test needs --user LOGIN")
            password = _test_password()
            if not password:
                raise click.ClickException("--send-test: no password given")
            send = (login, password, send_to)
        checks = common.run(run_checks(cfg, send))
        failed = any(c.status == "fail" for c in checks)
        if json_:
            common.emit_json({"ok": not failed, "checks": [asdict(c) for c in checks]})
        else:
            rows = [(c.check, c.status.upper(), c.detail) for c in checks]
            click.echo(common.table(["CHECK", "STATUS", "DETAIL"], rows))
            counts = {s: sum(c.status == s for c in checks) for s in ORDER}
            click.echo(f"\n{counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail")
        if failed:
            ctx.exit(1)
