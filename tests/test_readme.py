"""The README's quick start and worked example, run as written (issue 13, item 4).

The blocks run are the ones marked ``<!-- test: NAME -->`` in README.md; what they print is
compared with the output the README shows next to them (:func:`expect`: the README's sample
values, such as a timestamp, a queue id, a token or a password, match any value of their kind,
``...`` matches the rest of a line and a line ``...`` any lines). The README's list of replies
is held to relay/replies.py word for word.

What runs, for real: ``relaybox serve`` as a subprocess (started as tests/faults/procserver.py
starts it), the README's shell blocks through bash (with ``set -euo pipefail`` first), the
console script of the venv running the tests for every ``relaybox`` command the blocks give, the
real swaks and msmtp binaries, and python3 for the smtplib block. The quick start: serve, domain
add --sandbox, user add, swaks, inbox list, inbox show 1, then the smtplib block, each message
found in the inbox with DKIM pass. The worked example: the quick start's server gets the worked
example's config by SIGHUP (the README's ``kill -HUP``), which must regenerate the certificate
for the new public_hostname and apply it to the next connection; domain add, domain verify
(failing, then passing), user add, the swaks and msmtp (``~/.msmtprc``) examples of "Connecting an
app", and the last login written by the time the server has stopped.

What the test changes, and nothing else:

- The server listens on ephemeral ports (its config file holds ``[[listen]]`` with port 0): the
  ports it reports in its ``listening`` lines are put in place of 2587 and 2465 in the blocks and
  in the output they are compared with. The README says so in a comment at the top of its quick
  start. The commands find the config through ``RELAYBOX_CONFIG``, as the README's find theirs.
- HOME is a temporary directory, so the default state dir ``~/.local/state/relaybox`` (and the
  msmtp example's ``~/.msmtprc``) is inside it: nothing touches the machine's real paths.
- ``bash scripts/install`` is not run (it builds a venv from the network); the block's
  ``.venv/bin/relaybox`` is a link to the console script, in a temporary directory the blocks run
  in.
- The worked example's ``/etc/relaybox/relaybox.toml`` is a temporary file, with the resolver
  pointed at the test DNS server (tests/dnsserver.py, on loopback) added to its ``[dns]`` table:
  ``domain verify`` first meets a zone with nothing published (the failures the README shows),
  then the records ``domain show --json`` gives, published there as an operator would at a DNS
  provider. With public DNS that step cannot run as written. The server's copy of that file
  differs only in the listeners and ``delivery.paused`` (no message leaves the box).
- "Connecting an app" connects to ``localhost``, as the README says to on the box itself, rather
  than ``smtp.example.com`` (which does not resolve here).

Not executed: ``bash scripts/install`` and ``bash scripts/test``, the production install (587 and
465, systemd, ``systemctl reload``), a restart, and delivery of any message.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import string
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import replies
from tests import leaks
from tests.dnsserver import TestDNSServer
from tests.faults.procserver import ServerProcess
from tests.test_domain_cli import publish
from tests.test_sandbox import CONSOLE, run

README = Path(__file__).resolve().parent.parent / "README.md"
QUICK_PORTS = {"starttls": 2587, "tls": 2465}  # the embedded defaults the README shows

# Values the README shows that differ from run to run, and what each may be instead.
SAMPLES = {
    "2026-12-01T23:09:02Z": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",  # a timestamp
    "06h37nj60nenbqcm": r"[0-9a-v]{16}",  # a queue id
    "a93627f08abdfe9453c5a73bdaf6e22e": r"[0-9a-f]{32}",  # an ownership token
    "jPwCgQiStuMiPsCYiST5Kzcfwq": r"\S{20,}",  # a generated password
    "Received: from vm ": r"Received: from \S+ ",  # swaks's EHLO name: the machine's host name
    "  931": r"  +\d+",  # a message size
}
_ELLIPSIS = r"\.\.\.(?:\([^)]*\))?"  # "..." or "...(what was left out)"
_SPLIT = re.compile("(" + "|".join([*map(re.escape, SAMPLES), _ELLIPSIS]) + ")")

NOT_SENDING = "[delivery]\npaused = true\n"  # no message leaves the box
LISTEN_ANY = "".join(
    f'[[listen]]\naddress = "127.0.0.1"\nport = 0\nmode = "{mode}"\n' for mode in QUICK_PORTS
)


def block(name: str) -> str:
    """The fenced block right after ``<!-- test: NAME -->`` (or, inline, the code span)."""
    text = README.read_text()
    fenced = re.search(rf"<!-- test: {re.escape(name)} -->\n```[^\n]*\n(.*?)\n```\n", text, re.S)
    if fenced:
        return fenced.group(1)
    inline = re.search(rf"<!-- test: {re.escape(name)} -->`([^`]+)`", text)
    assert inline, f"README.md has no block marked <!-- test: {name} -->"
    return inline.group(1)


def line_regex(line: str) -> str:
    out = []
    for i, part in enumerate(_SPLIT.split(line)):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            out.append(SAMPLES.get(part, ".*"))
    return "".join(out)


def expect(shown: str, actual: str) -> None:
    """The lines ``shown`` appear in ``actual``, in order and one after another (but where the
    README shows a line ``...``); the first that does not is named."""
    lines = shown.splitlines()
    parts = [r"(?:.*\n)*?" if ln == "..." else line_regex(ln) + r"\n" for ln in lines]
    text = actual if actual.endswith("\n") else actual + "\n"
    for n in range(1, len(parts) + 1):
        if not re.search("^" + "".join(parts[:n]), text, re.M):
            raise AssertionError(
                f"the README shows {lines[n - 1]!r} (line {n} of its block) but the output has "
                f"no such line there:\n{actual}"
            )


def console(shown: str) -> tuple[list[str], str]:
    """A ``console`` block: the command (its ``$ `` line) and the output shown for it."""
    first, _, output = shown.partition("\n")
    assert first.startswith("$ relaybox "), first
    return ["relaybox", *shlex.split(first[2:])[1:]], output


def with_ports(text: str, ports: dict[str, int]) -> str:
    for mode, readme_port in QUICK_PORTS.items():
        text = re.sub(rf"\b{readme_port}\b", str(ports[mode]), text)
    return text


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary HOME, so ``~/.local/state/relaybox`` is the default state dir in it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("STATE_DIRECTORY", "RELAYBOX_CONFIG", "NOTIFY_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    yield home


async def bash(script: str, cwd: Path) -> tuple[int, str, str]:
    path = cwd / "block.sh"
    path.write_text(f"set -euo pipefail\ncd {shlex.quote(str(cwd))}\n{script}\n")
    return await run("bash", str(path))


async def relaybox(*args: str) -> tuple[int, str, str]:
    return await run(str(CONSOLE), *args)


async def start_server(config: Path) -> ServerProcess:
    server = ServerProcess(config, listeners=2)
    await server.start()
    assert set(server.ports) == {"starttls", "tls"}, server.lines
    return server


async def stop(server: ServerProcess) -> None:
    server.signal(signal.SIGTERM)
    assert await server.wait() == 0, server.lines[-20:]


async def test_the_quick_start(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert block("quickstart-serve") == "bash scripts/install && .venv/bin/relaybox serve"
    listen = tmp_path / "listen.toml"
    listen.write_text(LISTEN_ANY)
    monkeypatch.setenv("RELAYBOX_CONFIG", str(listen))
    clone = tmp_path / "clone"
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / "bin" / "relaybox").symlink_to(CONSOLE)
    server = await start_server(listen)
    try:
        cert = home / ".local" / "state" / "relaybox" / "tls" / "cert.pem"
        assert str(cert) in server.lines[0], "the README: its path is in the first log line"
        for name in ("quickstart", "quickstart-python"):
            assert "2587" in block(name), f"{name}: the README's port is gone, fix the test"
        script = with_ports(block("quickstart") + "\n" + block("quickstart-python"), server.ports)
        rc, out, err = await bash(script, clone)
        assert rc == 0, out + err
        expect(with_ports(block("quickstart-output"), server.ports), out)
        queued = re.findall(r"<~  250 2\.0\.0 queued as (\S+)", out)
        assert queued and f"(queue id {queued[0]})" in out, out

        rc, listed_json, err = await relaybox("inbox", "list", "--json")
        assert rc == 0, err
        listed = json.loads(listed_json)  # newest first: smtplib's, then swaks's
        assert [(m["subject"], m["to"]) for m in listed] == [
            ("hi", ["you@example.com"]),
            ("hello from relaybox", ["you@example.com"]),
        ]
        rc, shown_json, err = await relaybox("inbox", "show", str(listed[0]["id"]), "--json")
        assert rc == 0, err
        assert json.loads(shown_json)["dkim"]["result"] == "pass"
        await stop(server)
    finally:
        await server.ensure_stopped()
    assert not any("Traceback" in line for line in server.lines), "\n".join(server.lines)


def worked_config(tmp_path: Path, dns_server: TestDNSServer) -> Path:
    """The README's /etc/relaybox/relaybox.toml, with the resolver added to its [dns] table."""
    shown = block("worked-config")
    assert shown.startswith("# /etc/relaybox/relaybox.toml\n"), shown
    headers = [ln for ln in shown.splitlines() if ln.startswith("[")]
    assert headers[-1] == "[dns]", "the test appends its resolver to the last table, [dns]"
    path = tmp_path / "relaybox.toml"
    path.write_text(
        f'{shown}\nnameservers = ["127.0.0.1"]\nport = {dns_server.port}\ntimeout = "2s"\n'
    )
    return path


async def run_console(name: str, want_rc: int = 0) -> str:
    argv, shown = console(block(name))
    rc, out, err = await relaybox(*argv[1:])
    assert rc == want_rc, (rc, out, err)
    expect(shown, out + err)
    return out


async def test_the_worked_example_and_connecting_an_app(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dns_server: TestDNSServer
) -> None:
    # The quick start's server (embedded defaults but for the ports; not sending anything).
    served = tmp_path / "serve.toml"
    served.write_text(LISTEN_ANY + NOT_SENDING)
    server = await start_server(served)
    try:
        conf = worked_config(tmp_path, dns_server)
        monkeypatch.setenv("RELAYBOX_CONFIG", str(conf))
        # The server's copy of the same file, and the reload the README asks for (kill -HUP).
        served.write_text(conf.read_text() + "\n" + LISTEN_ANY + NOT_SENDING)
        server.signal(signal.SIGHUP)
        regenerated = await server.wait_for_line("generated a self-signed one for smtp.example.com")
        assert "public_hostname changed: the previous one named localhost" in regenerated
        await server.wait_for_line(f"reloaded config from {served}")

        await run_console("worked-domain-add")
        await run_console("worked-domain-verify", want_rc=1)
        rc, shown, err = await relaybox("domain", "show", "example.com", "--json")
        assert rc == 0, err
        publish(dns_server, json.loads(shown))  # what the operator does at the DNS provider
        rc, out, err = await relaybox("domain", "verify", "example.com")
        assert rc == 0 and "example.com: verified" in out, out + err
        added = await run_console("worked-user-add")
        password = leaks.add(re.findall(r"^Password: +(\S+)$", added, re.M)[0])

        # Connecting an app, with the host the README says to use on the box itself.
        swaks = with_ports(block("app-swaks"), server.ports)
        assert "--server smtp.example.com " in swaks
        monkeypatch.setenv("PASSWORD", password)
        rc, out, err = await bash(swaks.replace("smtp.example.com", "localhost"), tmp_path)
        assert rc == 0 and "<~  250 2.0.0 queued as" in out, out + err
        assert "<-  220 smtp.example.com ESMTP relaybox" in out  # the reload's public_hostname

        msmtprc = with_ports(block("app-msmtprc"), server.ports)
        assert "host smtp.example.com\n" in msmtprc and "password <the password>\n" in msmtprc
        msmtprc = msmtprc.replace("host smtp.example.com", "host localhost")
        (home / ".msmtprc").write_text(msmtprc.replace("<the password>", password) + "\n")
        (home / ".msmtprc").chmod(0o600)
        rc, out, err = await bash(block("app-msmtp"), tmp_path)
        assert rc == 0, out + err
        await stop(server)
    finally:
        await server.ensure_stopped()
    assert not [line for line in server.lines if password in line or "Traceback" in line]
    queued = [line for line in server.lines if "relaybox.mail: queued id=" in line]
    assert len(queued) == 2, server.lines  # swaks's and msmtp's

    # The last login is written when the server stops at the latest (README: next to user list).
    rc, out, err = await relaybox("user", "list", "--json")
    assert rc == 0, err
    [user] = json.loads(out)
    assert user["last_login_at"], user


# The replies an app sees most, which the README's list must hold (issue 13, item 4).
LISTED = (
    "AUTH_OK", "AUTH_FAILED", "AUTH_TOO_MANY", "AUTH_THROTTLED", "AUTH_REQUIRED", "AUTH_NEEDS_TLS",
    "SENDER_NOT_OWNED", "SENDER_DOMAIN_UNVERIFIED", "HEADER_FROM_MISMATCH", "HEADER_FROM_MISSING",
    "HEADER_SYNTAX", "BARE_LINE_ENDING", "MESSAGE_TOO_BIG", "TEMP_FAILURE", "QUEUED",
    "LIMIT_REACHED", "SENDER_NOT_ALLOWED", "HEADER_NOT_ALLOWED", "SUPPRESSED", "PROXY_REFUSED",
)  # fmt: skip


def _fields(text: str) -> list[str]:
    return [name for _lit, name, _spec, _conv in string.Formatter().parse(text) if name]


def test_the_list_of_replies_is_the_catalogue() -> None:
    """Every reply the README lists is one relay/replies.py sends, word for word."""
    text = README.read_text()
    start = text.index("<!-- test: replies -->\n")
    table = text[start:].split("\n\n", 1)[0]
    listed = [
        cell
        for row in table.splitlines()[3:]
        for cell in re.findall(r"`([^`]+)`", row.split(" | ")[0])
    ]
    catalogue = {  # a template's fields as <name>: "451 4.7.1 <login>: limit of <limit> ..."
        name: str(value.fill(**{f: f"<{f}>" for f in _fields(value.text)}))
        for name, value in vars(replies).items()
        if isinstance(value, replies.Reply)
    }
    assert listed and [r for r in listed if r not in catalogue.values()] == []
    assert [name for name in LISTED if catalogue[name] not in listed] == []
