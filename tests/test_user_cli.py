"""`relaybox user ...` and `relaybox audit` via Click's runner: JSON shapes, errors, no leaks."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any

import pytest

from relay.config import Config
from relay.store import logins, shared
from relay.store.passwords import Hasher
from tests import leaks
from tests.userhelpers import json_of, make_domain_sync, one_line_error

LIST_KEYS = [
    "login",
    "domain",
    "created_at",
    "last_login_at",
    "password_changed_at",
    "old_password_valid_until",
    "disabled",
]
# Issue 14: the per-user controls, after the keys above (whose shapes stay as they were).
CONTROL_KEYS = ["limits", "allow_ip", "allow_from", "expires_at", "usage_today"]
DEFAULT_LIMITS = {  # the config's [limits.user] defaults (none set in the CLI config)
    "messages_per_hour": {"limit": 1000, "default": True},
    "messages_per_day": {"limit": 10000, "default": True},
    "recipients_per_day": {"limit": 20000, "default": True},
}
NO_USAGE = {"messages": 0, "recipients": 0, "messages_this_hour": 0, "limited": []}
LISTENERS = [{"port": 587, "security": "STARTTLS"}, {"port": 465, "security": "SSL/TLS"}]
CHOSEN = "chosen-password-for-stdin"


def _verify(conf: Config, login: str, password: str) -> str | None:
    async def _main() -> str | None:
        hasher = Hasher(conf.auth)
        db = await shared.open_main(conf)
        try:
            r = await logins.verify(db, login, password, hasher=hasher, now=time.time())
            return r.matched
        finally:
            await db.close()
            hasher.close()

    return asyncio.run(_main())


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _add(relaybox: Any, login: str = "app@example.com") -> str:
    data = json_of(relaybox("user", "add", login, "--json"))
    return leaks.add(data["password"])


# --- add ------------------------------------------------------------------------------------------


def test_add_prints_a_generated_password_once_with_connection_info(
    relaybox: Any, conf: Config, domain: str
) -> None:
    data = json_of(relaybox("user", "add", "App@Example.com", "--json"))
    leaks.add(data["password"])
    assert list(data) == ["login", "password", "host", "listeners", "old_password_valid_until"]
    assert data["login"] == "app@example.com"
    assert len(data["password"]) >= 26
    assert data["host"] == "smtp.relay.test"
    assert data["listeners"] == LISTENERS
    assert data["old_password_valid_until"] is None
    assert _verify(conf, "app@example.com", data["password"]) == "current"

    text = relaybox("user", "add", "second@example.com")
    assert text.exit_code == 0, text.output
    password = leaks.add(text.stdout.split("Password:")[1].split()[0])
    assert _verify(conf, "second@example.com", password) == "current"
    assert text.stdout.count(password) == 1
    for needle in ("smtp.relay.test", "587", "STARTTLS", "465", "SSL/TLS", "reset-password"):
        assert needle in text.stdout


def test_add_with_password_from_stdin_never_echoes_it(
    relaybox: Any, conf: Config, domain: str
) -> None:
    leaks.add(CHOSEN)
    data = json_of(
        relaybox(
            "user", "add", "app@example.com", "--password-stdin", "--json", input=CHOSEN + "\n"
        )
    )
    assert data["password"] is None
    assert _verify(conf, "app@example.com", CHOSEN) == "current"
    text = relaybox("user", "add", "b@example.com", "--password-stdin", input=CHOSEN + "\r\n")
    assert text.exit_code == 0, text.output
    assert CHOSEN not in text.output
    assert _verify(conf, "b@example.com", CHOSEN) == "current"


def test_add_errors_are_one_line(relaybox: Any, conf: Config, domain: str) -> None:
    make_domain_sync(conf, "pending.example", now=time.time(), verified=False)
    one_line_error(
        relaybox("user", "add", "a@pending.example"),
        "not verified",
        "relaybox domain verify pending.example",
    )
    one_line_error(relaybox("user", "add", "a@unknown.example"), "relaybox domain add")
    one_line_error(relaybox("user", "add", "not-a-login"), "name@domain")
    weak = leaks.add("abcdefghijklm")  # 13 characters: the config asks for 14
    one_line_error(
        relaybox("user", "add", "a@example.com", "--password-stdin", input=weak + "\n"),
        "at least 14",
    )
    one_line_error(
        relaybox("user", "add", "a@example.com", "--password-stdin", input="\n"), "no password"
    )
    _add(relaybox, "a@example.com")
    one_line_error(relaybox("user", "add", "A@example.com"), "already exists")


# --- list and show --------------------------------------------------------------------------------


def test_list_and_show_shapes(relaybox: Any, conf: Config, domain: str) -> None:
    assert json_of(relaybox("user", "list", "--json")) == []
    make_domain_sync(conf, "other.example", now=time.time())
    before = time.time()
    pw = _add(relaybox, "b@example.com")
    _add(relaybox, "a@example.com")
    _add(relaybox, "c@other.example")
    listed = json_of(relaybox("user", "list", "--json"))
    assert [u["login"] for u in listed] == ["a@example.com", "b@example.com", "c@other.example"]
    for entry in listed:
        assert list(entry) == [*LIST_KEYS, *CONTROL_KEYS]
        assert entry["limits"] == DEFAULT_LIMITS
        assert entry["allow_ip"] == [] and entry["allow_from"] == []
        assert entry["expires_at"] is None
        assert entry["usage_today"] == NO_USAGE
        assert entry["last_login_at"] is None
        assert entry["old_password_valid_until"] is None
        assert entry["disabled"] is False
        assert _ts(entry["created_at"]) >= int(before)
        assert entry["password_changed_at"] == entry["created_at"]
    only = json_of(relaybox("user", "list", "--domain", "other.example", "--json"))
    assert [u["login"] for u in only] == ["c@other.example"]

    shown = json_of(relaybox("user", "show", "b@example.com", "--json"))
    assert list(shown) == [*LIST_KEYS, *CONTROL_KEYS, "host", "listeners", "sandbox"]
    assert {k: shown[k] for k in CONTROL_KEYS} == {k: listed[1][k] for k in CONTROL_KEYS}
    assert shown["sandbox"] is False  # tests/test_sandbox.py: True
    assert shown["domain"] == "example.com"
    assert shown["host"] == "smtp.relay.test"
    assert shown["listeners"] == LISTENERS
    text = relaybox("user", "show", "b@example.com")
    assert text.exit_code == 0
    assert "cannot be shown" in text.stdout and "only a hash" in text.stdout
    assert "relaybox user reset-password b@example.com" in text.stdout
    assert "SSL/TLS" in text.stdout
    for needle in ("messages per hour", "1000 (default)", "Expires:    never", "Today:"):
        assert needle in text.stdout
    table = relaybox("user", "list")
    assert table.exit_code == 0 and "c@other.example" in table.stdout
    assert "Expires" in table.stdout.splitlines()[0]
    for out in (text.stdout, table.stdout, json.dumps(listed), json.dumps(shown)):
        assert pw not in out and "$argon2" not in out


def test_show_unknown_user(relaybox: Any, domain: str) -> None:
    one_line_error(relaybox("user", "show", "ghost@example.com"), "no such user")
    one_line_error(relaybox("user", "show", "ghost@example.com", "--json"), "no such user")


# --- reset, revoke, delete, disable ---------------------------------------------------------------


def test_reset_password_keeps_the_old_one_for_the_default_grace(
    relaybox: Any, conf: Config, domain: str
) -> None:
    old = _add(relaybox)
    before = time.time()
    data = json_of(relaybox("user", "reset-password", "app@example.com", "--json"))
    new = leaks.add(data["password"])
    assert list(data) == ["login", "password", "host", "listeners", "old_password_valid_until"]
    assert new != old
    until = _ts(data["old_password_valid_until"])
    assert int(before) + 7200 <= until <= time.time() + 7200  # reset_grace = "2h" in the config
    assert _verify(conf, "app@example.com", new) == "current"
    assert _verify(conf, "app@example.com", old) == "previous"
    shown = json_of(relaybox("user", "show", "app@example.com", "--json"))
    assert shown["old_password_valid_until"] == data["old_password_valid_until"]

    revoked = relaybox("user", "revoke-old", "app@example.com")
    assert revoked.exit_code == 0 and "no longer works" in revoked.stdout
    assert _verify(conf, "app@example.com", old) is None
    assert _verify(conf, "app@example.com", new) == "current"
    again = relaybox("user", "revoke-old", "app@example.com")
    assert again.exit_code == 0 and "nothing changed" in again.stdout


def test_reset_with_grace_zero_and_explicit_durations(
    relaybox: Any, conf: Config, domain: str
) -> None:
    p1 = _add(relaybox)
    data = json_of(relaybox("user", "reset-password", "app@example.com", "--grace", "0", "--json"))
    p2 = leaks.add(data["password"])
    assert data["old_password_valid_until"] is None
    assert _verify(conf, "app@example.com", p1) is None
    assert _verify(conf, "app@example.com", p2) == "current"

    before = time.time()
    data = json_of(
        relaybox(
            "user",
            "reset-password",
            "app@example.com",
            "--grace",
            "15m",
            "--password-stdin",
            "--json",
            input=leaks.add(CHOSEN) + "\n",
        )
    )
    assert data["password"] is None
    assert int(before) + 900 <= _ts(data["old_password_valid_until"]) <= time.time() + 900
    assert _verify(conf, "app@example.com", CHOSEN) == "current"
    assert _verify(conf, "app@example.com", p2) == "previous"


def test_reset_errors_are_one_line(relaybox: Any, domain: str) -> None:
    _add(relaybox)
    one_line_error(
        relaybox("user", "reset-password", "app@example.com", "--grace", "soon"),
        "--grace",
        "not a duration",
    )
    one_line_error(relaybox("user", "reset-password", "ghost@example.com"), "no such user")
    one_line_error(
        relaybox(
            "user",
            "reset-password",
            "app@example.com",
            "--password-stdin",
            input=leaks.add("zzzzzzzzzzzzzzzzzz") + "\n",
        ),
        "one character repeated",
    )
    for command in ("revoke-old", "disable", "enable"):
        one_line_error(relaybox("user", command, "ghost@example.com"), "no such user")
    one_line_error(relaybox("user", "delete", "ghost@example.com", "--yes"), "no such user")


def test_reset_grace_is_capped_at_30_days(relaybox: Any, conf: Config, domain: str) -> None:
    """An old password cannot be left working for years by a typo: --grace over 30d is refused
    (the error says the cap), before any password is read or changed."""
    p1 = _add(relaybox)
    for too_long in ("99999d", "31d", "2592001s"):
        one_line_error(
            relaybox("user", "reset-password", "app@example.com", "--grace", too_long),
            "--grace",
            too_long,
            "at most 30d",
        )
    assert _verify(conf, "app@example.com", p1) == "current"
    before = time.time()
    data = json_of(
        relaybox("user", "reset-password", "app@example.com", "--grace", "30d", "--json")
    )
    leaks.add(data["password"])
    assert int(before) + 30 * 86400 <= _ts(data["old_password_valid_until"])


def test_delete_disable_enable(relaybox: Any, conf: Config, domain: str) -> None:
    pw = _add(relaybox)
    one_line_error(relaybox("user", "delete", "app@example.com"), "--yes")  # no terminal to ask
    assert _verify(conf, "app@example.com", pw) == "current"

    disabled = relaybox("user", "disable", "app@example.com")
    assert disabled.exit_code == 0 and "disabled" in disabled.stdout
    assert _verify(conf, "app@example.com", pw) is None
    assert json_of(relaybox("user", "show", "app@example.com", "--json"))["disabled"] is True
    assert relaybox("user", "enable", "app@example.com").exit_code == 0
    assert _verify(conf, "app@example.com", pw) == "current"

    deleted = relaybox("user", "delete", "app@example.com", "--yes")
    assert deleted.exit_code == 0, deleted.output
    assert _verify(conf, "app@example.com", pw) is None
    assert json_of(relaybox("user", "list", "--json")) == []


# --- audit and leaks ------------------------------------------------------------------------------


def test_audit_lists_every_action_and_no_password(relaybox: Any, domain: str) -> None:
    p1 = _add(relaybox)
    data = json_of(relaybox("user", "reset-password", "app@example.com", "--grace", "0", "--json"))
    p2 = leaks.add(data["password"])
    assert relaybox("user", "disable", "app@example.com").exit_code == 0
    assert relaybox("user", "delete", "app@example.com", "--yes").exit_code == 0
    events = json_of(relaybox("audit", "--target", "app@example.com", "--json"))
    assert [e["action"] for e in events] == [
        "user.delete",
        "user.disable",
        "user.reset-password",
        "user.add",
    ]
    assert list(events[0]) == ["id", "at", "actor", "action", "target", "detail"]
    assert events[1]["actor"]
    assert events[2]["detail"] == "grace=0s"
    assert len(json_of(relaybox("audit", "--limit", "2", "--json"))) == 2
    text = relaybox("audit")
    assert text.exit_code == 0 and "user.reset-password" in text.stdout
    for out in (text.stdout, json.dumps(events)):
        assert p1 not in out and p2 not in out
    usage = relaybox("audit", "--limit", "0")  # a usage error: Click's exit 2 with usage help
    assert usage.exit_code == 2 and "--limit" in usage.stderr


def test_no_password_in_logs_or_listings(
    relaybox: Any, conf: Config, domain: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every password made here is registered; the autouse check scans all log records too."""
    p1 = _add(relaybox)
    stdin_pw = leaks.add("another-chosen-password")
    assert (
        relaybox(
            "user", "add", "b@example.com", "--password-stdin", input=stdin_pw + "\n"
        ).exit_code
        == 0
    )
    p2 = leaks.add(
        json_of(relaybox("user", "reset-password", "app@example.com", "--json"))["password"]
    )
    assert _verify(conf, "app@example.com", p1) == "previous"
    assert _verify(conf, "app@example.com", "wrong-password-here") is None
    outputs = [
        relaybox("user", "list").output,
        relaybox("user", "list", "--json").output,
        relaybox("user", "show", "app@example.com").output,
        relaybox("user", "show", "app@example.com", "--json").output,
        relaybox("user", "revoke-old", "app@example.com").output,
        relaybox("audit", "--json").output,
    ]
    assert not leaks.find_in("\n".join(outputs))
    for pw in (p1, p2, stdin_pw):
        assert all(pw not in out for out in outputs)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert not leaks.find_in(logged)
