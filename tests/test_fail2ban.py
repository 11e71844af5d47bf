"""conf/fail2ban/ against real mail-log lines (made by relay.maillog), with fail2ban's own tools.

The lines are produced by calling relay.maillog with the format `relaybox serve` writes, then
framed the two ways fail2ban reads them: as its journal backend formats an entry of
relaybox.service (``host relaybox[pid]: MESSAGE``) and as rsyslog writes it to a file (with an
RFC 3339 date first). fail2ban-regex and fail2ban-client come from Debian's fail2ban package
(scripts/test installs it); without it those tests skip and the regex is still checked in Python.
"""

from __future__ import annotations

import asyncio
import configparser
import io
import logging
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from relay import maillog
from tests.dialogue import Dialogue, plain
from tests.test_service import (
    LOGIN,
    Service,
    add_user,
    client_context,
    fake_notify_socket,
    make_box,
    service,
)

ROOT = Path(__file__).resolve().parent.parent
FILTER = ROOT / "conf" / "fail2ban" / "filter.d" / "relaybox.conf"
JAIL = ROOT / "conf" / "fail2ban" / "jail.d" / "relaybox.conf"
SYSTEM_F2B = Path("/etc/fail2ban")
# What `relaybox serve` writes under journald (admin/serve_cmd.py; journald adds the time).
SERVE_FORMAT = "%(levelname)s %(name)s: %(message)s"

needs_f2b = pytest.mark.skipif(
    shutil.which("fail2ban-regex") is None or not (SYSTEM_F2B / "filter.d/common.conf").exists(),
    reason="fail2ban not installed: filter checked only by the Python regex test",
)

# (call, the IP fail2ban must count or None). Logins try to forge a second ip= field or line.
EVENTS = [
    (lambda: maillog.auth_failed("app@example.com", "203.0.113.7", "PLAIN", "bad_password"),
     "203.0.113.7"),
    (lambda: maillog.auth_failed("x ip=198.51.100.66", "203.0.113.8", "LOGIN", "unknown_user"),
     "203.0.113.8"),
    (lambda: maillog.auth_failed(
        "e\nINFO relaybox.mail: auth failed user=a ip=198.51.100.77", "2001:db8::5", "PLAIN",
        "bad_password"),
     "2001:db8::5"),
    (lambda: maillog.auth_throttled("203.0.113.9"), "203.0.113.9"),
    (lambda: maillog.auth_throttled("203.0.113.10", user="bob@example.com"), "203.0.113.10"),
    (lambda: maillog.auth_ok("app@example.com", "198.51.100.1", "PLAIN"), None),
    (lambda: maillog.queued("abc123", "app@example.com", 2, 1234, "app@example.com",
                            "198.51.100.2"), None),
    (lambda: maillog.rejected("rcpt", "too_many_recipients", "198.51.100.3"), None),
]  # fmt: skip
EXPECTED = [ip for _, ip in EVENTS if ip]


@pytest.fixture
def mail_messages() -> Iterator[list[str]]:
    """The formatted messages relay.maillog emits for EVENTS (one per event)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(SERVE_FORMAT))
    logger = logging.getLogger("relaybox.mail")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for call, _ in EVENTS:
            call()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(EVENTS), "a mail-log message spans several lines"
    yield lines


def journal_lines(messages: list[str]) -> list[str]:
    """As fail2ban's systemd backend formats an entry: _HOSTNAME SYSLOG_IDENTIFIER[PID]: MESSAGE."""
    return [f"mailbox relaybox[4242]: {m}" for m in messages]


def syslog_lines(messages: list[str]) -> list[str]:
    """As rsyslog on Debian 12 writes them to /var/log/syslog."""
    return [f"2025-05-01T12:00:{i:02d}.123456+00:00 mailbox relaybox[4242]: {m}"
            for i, m in enumerate(messages)]  # fmt: skip


def filter_dir(tmp_path: Path) -> Path:
    """Our filter beside the system's common.conf (which it includes), as once installed."""
    d = tmp_path / "filter.d"
    d.mkdir()
    shutil.copy(FILTER, d / "relaybox.conf")
    (d / "common.conf").symlink_to(SYSTEM_F2B / "filter.d" / "common.conf")
    return d


def fail2ban_regex(tmp_path: Path, lines: list[str], filter_spec: str) -> list[str]:
    log = tmp_path / "mail.log"
    log.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        ["fail2ban-regex", "--raw", "-o", "ip", str(log), filter_spec],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.split()


@needs_f2b
@pytest.mark.parametrize("logtype", ["journal", "file"])
def test_fail2ban_regex_on_journal_entries(
    tmp_path: Path, mail_messages: list[str], logtype: str
) -> None:
    spec = f"{filter_dir(tmp_path) / 'relaybox.conf'}[logtype={logtype}]"
    assert fail2ban_regex(tmp_path, journal_lines(mail_messages), spec) == EXPECTED


@needs_f2b
def test_fail2ban_regex_on_a_syslog_file(tmp_path: Path, mail_messages: list[str]) -> None:
    spec = str(filter_dir(tmp_path) / "relaybox.conf")
    assert fail2ban_regex(tmp_path, syslog_lines(mail_messages), spec) == EXPECTED


@needs_f2b
def test_fail2ban_client_accepts_the_jail(tmp_path: Path) -> None:
    conf = tmp_path / "fail2ban"
    shutil.copytree(SYSTEM_F2B, conf, symlinks=True)
    # Debian's default sshd jail needs a log file this box may not have; it is not ours to test.
    (conf / "jail.d" / "defaults-debian.conf").unlink(missing_ok=True)
    shutil.copy(FILTER, conf / "filter.d" / "relaybox.conf")
    shutil.copy(JAIL, conf / "jail.d" / "relaybox.conf")
    proc = subprocess.run(
        ["fail2ban-client", "-c", str(conf), "-t"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dump = subprocess.run(
        ["fail2ban-client", "-c", str(conf), "-d"], capture_output=True, text=True, check=True
    ).stdout
    assert "['add', 'relaybox', 'systemd']" in dump
    assert "_SYSTEMD_UNIT=relaybox.service" in dump
    assert "587,465" in dump


def python_failregexes() -> tuple[re.Pattern[str], list[re.Pattern[str]]]:
    """The filter's prefregex/failregex with fail2ban's tags turned into plain Python regex."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(FILTER)
    d = parser["Definition"]
    prefix = re.compile(r"^(?:\S+\s+)?relaybox(?:\[\d+\])?:\s+" + d["__mail_logger"] + r" (.+)$")

    def convert(rx: str) -> re.Pattern[str]:
        rx = rx.replace("<HOST>", r"(?P<host>[0-9A-Fa-f:.]+)")
        rx = rx.replace("<F-USER>", "(?P<user>").replace("</F-USER>", ")")
        return re.compile(rx)

    return prefix, [convert(x.strip()) for x in d["failregex"].splitlines() if x.strip()]


def test_same_regex_in_python(mail_messages: list[str]) -> None:
    prefix, failregexes = python_failregexes()
    found = []
    for line in journal_lines(mail_messages):
        m = prefix.match(line)
        assert m, line
        for rx in failregexes:
            hit = rx.search(m.group(1))
            if hit:
                found.append(hit.group("host"))
                break
    assert found == EXPECTED


def test_jail_settings() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(JAIL)
    jail = parser["relaybox"]
    assert jail.getboolean("enabled")
    assert jail["filter"] == "relaybox" and jail["backend"] == "systemd"
    assert jail["port"] == "587,465"
    # More patient than relaybox's own lockout (5 failures): the ban is for clients that persist.
    assert jail.getint("maxretry") > 5


@needs_f2b
async def test_lines_from_the_running_service(tmp_path: Path) -> None:
    """`relaybox serve` itself, logging as under journald: its auth-failure lines are counted."""
    ca = trustme.CA()
    (tmp_path / "box").mkdir()
    box = make_box(tmp_path / "box", ca)
    password = await add_user(box)
    journald = {"JOURNAL_STREAM": "8:12345"}  # serve then leaves the time to the journal
    with fake_notify_socket() as (sock, path):
        async with service(box, path, sock, env_extra=journald) as svc:
            await exercise(svc, ca, password)
    mail = [line for line in svc.lines if "relaybox.mail:" in line]
    assert len(mail) >= 3, svc.lines
    framed = [f"mailbox relaybox[{svc.proc.pid}]: {line}" for line in svc.lines]
    spec = f"{filter_dir(tmp_path) / 'relaybox.conf'}[logtype=journal]"
    assert await asyncio.to_thread(fail2ban_regex, tmp_path, framed, spec) == ["127.0.0.1"] * 2


async def exercise(svc: Service, ca: trustme.CA, password: str) -> None:
    """Two failed AUTHs (wrong password, unknown user), one good one, then a clean stop."""
    assert (await svc.notification()).get("READY") == "1"
    d = await Dialogue.open(await svc.port("starttls"))
    await d.expect_after("EHLO client.test", "250")
    await d.starttls(client_context(ca))
    await d.expect_after("EHLO client.test", "250")
    await d.expect_after("AUTH PLAIN " + plain(LOGIN, password + "x"), "535")
    await d.expect_after("AUTH PLAIN " + plain("nobody@example.com", "whatever-pw"), "535")
    await d.expect_after("AUTH PLAIN " + plain(LOGIN, password), "235")
    await d.expect_after("QUIT", "221")
    await d.close()
    svc.proc.send_signal(signal.SIGTERM)
    assert await svc.wait() == 0
